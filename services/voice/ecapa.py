"""Speaker embedding: SpeechBrain's ECAPA-TDNN (spkrec-ecapa-voxceleb), 192-d, 16 kHz input.

Served with ONNX Runtime (:class:`EcapaOnnx`): on this (shared, 2-core) CPU a 3 s clip took
160 ms (min; median 177) against 206 ms (median 230) for SpeechBrain on torch, one thread each,
interleaved (bench/voice_eval_dev.py); the same file serves on CUDA.
The graph holds only the ECAPA network; its input is SpeechBrain's 80-bin Fbank with sentence mean
normalisation, computed here by SpeechBrain's own Fbank module on torch (about 1 ms per 3 s clip),
so that the features are SpeechBrain's by construction. :func:`export_onnx` derives the ONNX file
from the checkpoint once (a deterministic step the model store can run); :class:`EcapaSpeechBrain`
is the reference it is tested against.

Embeddings are the raw network output (not length-normalised), as SpeechBrain's ``encode_batch``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from services.common.inference import create_session

SAMPLE_RATE = 16000
N_MELS = 80
EMBEDDING_DIM = 192
HOP = 160  # Fbank's 10 ms hop at 16 kHz
# Metadata written into the exported graph and checked on load: the input contract.
INPUT_CONTRACT = "speechbrain-fbank80-sentence-mean/v1"
_CONTRACT_KEY = "biogate.input"
_SOURCE_KEY = "biogate.source_sha256"

FloatArray = NDArray[np.float32]


class SpeakerEmbedder(Protocol):
    dim: int
    provider: str

    def embed(self, wav: FloatArray) -> FloatArray: ...

    def embed_batch(self, wavs: Sequence[FloatArray]) -> FloatArray: ...

    def warmup(self, wav: FloatArray) -> None: ...


def set_torch_threads(n: int | None) -> None:
    # Measured here: one intra-op thread per worker is about twice as fast as two for ECAPA.
    if n:
        torch.set_num_threads(n)


def frame_count(samples: int) -> int:
    """Fbank frames of a clip (centred frames: one per hop, plus one)."""
    return 1 + samples // HOP


class Features:
    """SpeechBrain's Fbank (80 mel bins, 25 ms / 10 ms) minus the utterance mean: [T, 80].

    :meth:`batch` computes the features of several clips in one pass on ``device`` (on a GPU, where
    ECAPA runs). Centred frames see zeros beyond a clip's end either way, and the 80 dB floor is
    taken from each row's maximum, which padding (at the -100 dB floor) cannot raise, so each clip's
    frames are its own features; the mean is taken over its own frames only."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from speechbrain.lobes.features import Fbank

        self.device = torch.device(device)
        self._fbank = Fbank(n_mels=N_MELS).eval().to(self.device)

    def __call__(self, wav: FloatArray) -> FloatArray:
        with torch.inference_mode():
            f = self._fbank(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None])[0]
            return (f - f.mean(dim=0, keepdim=True)).numpy()

    def batch(self, wavs: Sequence[FloatArray], frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, T, 80] of ``wavs`` on the device, zero beyond each clip's frames, and the
        clips' frame counts [N]; T = ``frames`` (at least the longest clip's), else the longest's."""
        counts = [frame_count(len(w)) for w in wavs]
        t = max(counts) if frames is None else frames
        if t < max(counts):
            raise ValueError(f"{t} frames cannot hold a clip of {max(counts)}")
        x = torch.zeros(len(wavs), max(len(w) for w in wavs))
        for row, w in enumerate(wavs):
            x[row, : len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        with torch.inference_mode():
            f = self._fbank(x.to(self.device, non_blocking=True))
            n = torch.tensor(counts, device=self.device)
            mask = (torch.arange(f.shape[1], device=self.device)[None] < n[:, None]).unsqueeze(-1)
            f = f * mask
            f = (f - f.sum(dim=1, keepdim=True) / n[:, None, None]) * mask
            if t > f.shape[1]:
                f = torch.nn.functional.pad(f, (0, 0, 0, t - f.shape[1]))
            return f.contiguous(), n


def frame_bucket(frames: int, pad_ratio: float) -> int:
    """The padded frame count of a clip: the smallest of ceil((1 + pad_ratio)^k) >= ``frames``, so
    batches meet a few shapes only (each new one is slow once on CUDA), padded by at most
    ``pad_ratio``; ``frames`` itself when pad_ratio is 0."""
    if pad_ratio <= 0 or frames <= 1:
        return frames
    k = max(0, math.floor(math.log(frames) / math.log1p(pad_ratio)) - 1)
    while (edge := math.ceil((1.0 + pad_ratio) ** k - 1e-9)) < frames:
        k += 1
    return edge


class EcapaOnnx:
    """The exported ECAPA network on ONNX Runtime.

    ``embed_batch`` computes each clip's features on its own, then runs clips of equal frame count
    together (exact). ``max_pad_ratio`` > 0 also groups clips up to that much longer than the
    shortest of the group, zero-padded with relative lengths (masked pooling): worth it on a GPU;
    padded results differ slightly (cosine >= 0.998 to the unpadded ones at 3x padding, measured).
    ``frame_buckets`` groups clips by :func:`frame_bucket` of ``max_pad_ratio`` instead and pads each
    group to its bucket's frame count, so that few shapes ever reach the network (CUDA); a clip alone
    is then padded too, which moves its embedding more than sharing a batch does (cosine 0.9915 for
    a 1.2 s clip padded by 12 %, tests/voice/test_gpu_paths.py): off until an EER run says otherwise.
    On this CPU batching gains nothing (compute-bound: 195 ms per 3 s clip in batches of 16).

    GPU paths (None: on where the session runs on CUDA, off on the CPU): ``device_features``
    computes each group's features in one batched pass on the session's torch device
    (:meth:`Features.batch`) instead of clip by clip on the CPU; ``io_binding`` hands the network
    its inputs through onnxruntime's IO binding, device tensors in place.
    """

    dim = EMBEDDING_DIM

    def __init__(self, onnx_path: str | os.PathLike[str], providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = 1, max_batch: int = 64, max_pad_ratio: float = 0.0,
                 device_features: bool | None = None, io_binding: bool | None = None,
                 frame_buckets: bool = False) -> None:
        set_torch_threads(threads)
        self.model = create_session(onnx_path, providers=providers, intra_op_threads=threads)
        meta = self.model.session.get_modelmeta().custom_metadata_map
        if meta.get(_CONTRACT_KEY) != INPUT_CONTRACT:
            raise ValueError(f"{onnx_path}: not an ECAPA export with input {INPUT_CONTRACT!r} "
                             f"(found {meta.get(_CONTRACT_KEY)!r}); re-run export_onnx")
        self.source_sha256 = meta.get(_SOURCE_KEY, "")
        self.provider = self.model.provider
        self.max_batch, self.max_pad_ratio, self.frame_buckets = max_batch, max_pad_ratio, frame_buckets
        on_cuda = self.model.device_type == "cuda"
        self.device_features = on_cuda if device_features is None else device_features
        self.io_binding = on_cuda if io_binding is None else io_binding
        self.features = Features("cuda" if on_cuda and self.device_features and torch.cuda.is_available() else "cpu")

    def embed(self, wav: FloatArray) -> FloatArray:
        return self.embed_batch([wav])[0]

    def warmup(self, wav: FloatArray) -> None:
        """One call at every batch size the network will run at (each new shape is slow once on CUDA)."""
        for b in self.model.buckets(self.max_batch):
            self.embed_batch([wav] * b)

    def embed_features(self, feats: FloatArray | torch.Tensor, lengths: FloatArray | torch.Tensor) -> FloatArray:
        """Raw network call: feats [N, T, 80] (zero-padded), lengths [N] relative to T, as numpy
        arrays or torch tensors (read in place with io_binding)."""
        if self.io_binding:
            wait = None
            if isinstance(feats, torch.Tensor) and feats.is_cuda:
                wait = torch.cuda.current_stream(feats.device).synchronize
            out = self.model.run_bound(["embedding"], {"feats": feats, "lengths": lengths}, before_run=wait)[0]
        else:
            host = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v
                    for k, v in (("feats", feats), ("lengths", lengths))}
            out = self.model.run(None, host)[0]
        return out.reshape(len(feats), EMBEDDING_DIM)

    def embed_batch(self, wavs: Sequence[FloatArray]) -> FloatArray:
        counts = [frame_count(len(w)) for w in wavs]
        feats = None if self.device_features else [self.features(w) for w in wavs]
        out = np.zeros((len(wavs), EMBEDDING_DIM), np.float32)
        for group in self._groups(counts):
            t = self._frames(max(counts[i] for i in group))
            if feats is None:
                on_device, n = self.features.batch([wavs[i] for i in group], t)
                out[group] = self.embed_features(on_device, n.to(torch.float32) / t)
                continue
            batch = np.zeros((len(group), t, N_MELS), np.float32)
            for row, i in enumerate(group):
                batch[row, : len(feats[i])] = feats[i]
            lengths = np.array([len(feats[i]) / t for i in group], np.float32)
            out[group] = self.embed_features(batch, lengths)
        return out

    def _frames(self, frames: int) -> int:
        """The frame count a group whose longest clip has ``frames`` runs at."""
        return frame_bucket(frames, self.max_pad_ratio) if self.frame_buckets else frames

    def _apart(self, first: int, frames: int) -> bool:
        """Whether a clip of ``frames`` cannot join a group that starts with one of ``first``."""
        if self.frame_buckets:
            return self._frames(frames) != self._frames(first)
        return frames > first * (1.0 + self.max_pad_ratio)

    def _groups(self, lengths: list[int]) -> Iterator[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        group: list[int] = []
        for i in order:
            if group and (len(group) >= self.max_batch or self._apart(lengths[group[0]], lengths[i])):
                yield group
                group = []
            group.append(i)
        if group:
            yield group


class EcapaSpeechBrain:
    """SpeechBrain's own EncoderClassifier on torch: the reference, and a fallback backend."""

    dim = EMBEDDING_DIM
    provider = "torch-cpu"

    def __init__(self, model_dir: str | os.PathLike[str], savedir: str | os.PathLike[str] | None = None,
                 threads: int | None = 1) -> None:
        set_torch_threads(threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from speechbrain.inference.speaker import EncoderClassifier

        model_dir = Path(model_dir).resolve()
        savedir = Path(savedir) if savedir else model_dir.parent / f".{model_dir.name}-speechbrain"
        self.classifier = EncoderClassifier.from_hparams(
            source=str(model_dir), savedir=str(savedir), overrides={"pretrained_path": str(model_dir)},
            run_opts={"device": "cpu"},
        )
        self.classifier.eval()

    def warmup(self, wav: FloatArray) -> None:
        self.embed(wav)

    def embed(self, wav: FloatArray) -> FloatArray:
        with torch.inference_mode():
            e = self.classifier.encode_batch(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None])
        return e.reshape(EMBEDDING_DIM).numpy()

    def embed_batch(self, wavs: Sequence[FloatArray]) -> FloatArray:
        return np.stack([self.embed(w) for w in wavs]) if len(wavs) else np.zeros((0, EMBEDDING_DIM), np.float32)


# ---------------------------------------------------------------------------------------------
# Export


def load_network(src_dir: str | os.PathLike[str]) -> torch.nn.Module:
    """The ECAPA_TDNN module of a SpeechBrain model directory, weights loaded, in eval mode."""
    from hyperpyyaml import load_hyperpyyaml

    src = Path(src_dir)
    with open(src / "hyperparams.yaml", encoding="utf-8") as fh:
        hparams = load_hyperpyyaml(fh, overrides={"pretrained_path": str(src)})
    net = hparams["embedding_model"]
    state = torch.load(src / "embedding_model.ckpt", map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


@contextlib.contextmanager
def _traceable_masks() -> Iterator[None]:
    # SpeechBrain's length_to_mask takes the batch size from len(), which tracing freezes into
    # the graph; this equivalent keeps the batch dimension dynamic.
    import speechbrain.lobes.models.ECAPA_TDNN as ecapa_module

    def length_to_mask(length, max_len=None, dtype=None, device=None):
        mask = torch.arange(max_len, device=length.device, dtype=length.dtype).unsqueeze(0) < length.unsqueeze(1)
        return mask.to(dtype or length.dtype)

    original = ecapa_module.length_to_mask
    ecapa_module.length_to_mask = length_to_mask
    try:
        yield
    finally:
        ecapa_module.length_to_mask = original


def export_onnx(src_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], opset: int = 17) -> Path:
    """Export the ECAPA network of ``src_dir`` to ``out_path`` (written atomically).

    Inputs: ``feats`` [N, T, 80] float32 (see :class:`Features`), ``lengths`` [N] (relative, 1.0 =
    whole). Output: ``embedding`` [N, 1, 192]. Same checkpoint and torch version: same bytes.
    """
    import onnx

    src, out = Path(src_dir), Path(out_path)
    net = load_network(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    example = (torch.zeros(2, 200, N_MELS), torch.tensor([1.0, 0.75]))
    with _traceable_masks(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            net, example, str(tmp), dynamo=False, opset_version=opset,
            input_names=["feats", "lengths"], output_names=["embedding"],
            dynamic_axes={"feats": {0: "batch", 1: "frames"}, "lengths": {0: "batch"}, "embedding": {0: "batch"}},
        )
    model = onnx.load(str(tmp))
    digest = hashlib.sha256((src / "embedding_model.ckpt").read_bytes()).hexdigest()
    for key, value in ((_CONTRACT_KEY, INPUT_CONTRACT), (_SOURCE_KEY, digest)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return out
