"""The voice service's GPU code paths (issue 13) run on the CPU device: the same code as on CUDA,
with CPU tensors. Batched Fbank on the model's device, bucketed ECAPA batches, onnxruntime IO
binding, AASIST in bfloat16, compiled, and with padded batches. Real models and fixture clips."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from services.common.config import PROJECT_ROOT
from services.common.modality.calibration import Calibrations
from services.voice.aasist import AasistDetector, AasistOptions
from services.voice.ecapa import EcapaOnnx, Features, frame_bucket, frame_count
from voice_audio import read


def cosine(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def clips(voice_dir):
    a = read(voice_dir / "libri_1688" / "1688-142285-0000.wav")
    b = read(voice_dir / "speechbrain_spk2" / "spk2_snt1.wav")
    c = read(voice_dir / "libri_3005" / "3005-163389-0000.wav")
    # 3 s, 4.4 s, a whole 2.9 s file, 1.2 s (not a multiple of the hop), and a second 3 s clip
    return [a[:48000], a[16000:16000 + 70000], b, c[:19_357], c[8000:56000]]


@pytest.fixture(scope="module")
def host(voice_models):
    model = EcapaOnnx(voice_models.ecapa_onnx)
    assert not model.device_features and not model.io_binding  # the CPU defaults: per-clip features, plain run
    return model


@pytest.fixture(scope="module")
def on_device(voice_models):
    return EcapaOnnx(voice_models.ecapa_onnx, device_features=True, io_binding=True)


def test_batched_features_equal_each_clips_own(clips):
    features = Features()
    batch, counts = features.batch(clips)
    assert batch.shape == (len(clips), max(frame_count(len(x)) for x in clips), 80)
    for row, x in enumerate(clips):
        alone = features(x)
        assert int(counts[row]) == len(alone) == frame_count(len(x))
        # values up to ~55; max difference measured 7.6e-6 (float32 sums taken in another order)
        assert np.abs(batch[row, : len(alone)].numpy() - alone).max() < 1e-4
        assert not batch[row, len(alone):].any()  # padding is zero, as the network's masks expect


def test_frame_buckets_bound_padding_and_shapes():
    for t in range(1, 2002):
        assert frame_bucket(t, 0.0) == t
        for ratio in (0.1, 0.25, 1.0):
            b = frame_bucket(t, ratio)
            assert t <= b <= math.ceil(t * (1 + ratio)) and frame_bucket(b, ratio) == b
    # 0.5 s to 20 s of audio (voice.max_embed_s) meets 18 frame counts at a pad ratio of 0.25
    assert len({frame_bucket(t, 0.25) for t in range(51, 2002)}) <= 18


def test_device_features_and_binding_equal_the_per_clip_path(host, on_device, clips):
    batch = on_device.embed_batch(clips + [clips[0]])
    for row, x in zip(batch, clips + [clips[0]], strict=True):
        alone = host.embed(x)
        # |values| up to ~70; measured 0.0: groups of equal frame counts get bit-identical features
        assert np.abs(row - alone).max() < 1e-3
        assert cosine(row, alone) > 0.99999


class ShapeLog(EcapaOnnx):
    """EcapaOnnx that records the shapes the network is run at."""

    shapes: list[tuple[int, ...]]

    def embed_features(self, feats, lengths):
        self.shapes.append(tuple(feats.shape))
        return super().embed_features(feats, lengths)


def test_bucketed_padded_batches_on_both_paths(voice_models, clips):
    """With frame buckets, groups run at bucket frame counts only, and the device path gives the
    host path's embeddings for the same padded shapes."""
    paths = {}
    for device in (False, True):
        model = ShapeLog(voice_models.ecapa_onnx, max_pad_ratio=0.25, device_features=device, io_binding=device,
                         frame_buckets=True)
        model.shapes = []
        paths[device] = (model.embed_batch(clips), model.shapes)
    (host_rows, host_shapes), (device_rows, device_shapes) = paths[False], paths[True]
    assert host_shapes == device_shapes
    assert all(t == frame_bucket(t, 0.25) for _, t, _ in device_shapes)
    assert any(n > 1 for n, _, _ in device_shapes)  # the two 3 s clips share a batch
    assert np.abs(host_rows - device_rows).max() < 1e-3
    exact = EcapaOnnx(voice_models.ecapa_onnx)
    # Padded by at most 25 %: min cosine measured 0.9915 (the 1.2 s clip, padded 121 -> 136 frames)
    assert min(cosine(row, exact.embed(x)) for row, x in zip(device_rows, clips, strict=True)) > 0.98


def test_io_binding_equals_a_plain_run(host, clips):
    """services/common/inference.py's binding code on the CPU device: numpy inputs, and torch
    tensors read in place, give the session's own outputs."""
    features = Features()
    feats = np.zeros((2, frame_count(len(clips[1])), 80), np.float32)
    f0, f1 = features(clips[0]), features(clips[1])
    feats[0, : len(f0)], feats[1] = f0, f1
    lengths = np.array([len(f0) / len(f1), 1.0], np.float32)
    model = host.model
    plain = model.run(None, {"feats": feats, "lengths": lengths})[0]
    bound = model.run_bound(["embedding"], {"feats": feats, "lengths": lengths})[0]
    waited = []  # on CUDA, ECAPA waits here for the torch stream that wrote the features
    in_place = model.run_bound(["embedding"], {"feats": torch.from_numpy(feats), "lengths": torch.from_numpy(lengths)},
                               before_run=lambda: waited.append(True))[0]
    assert waited == [True]
    assert plain.shape == bound.shape == in_place.shape == (2, 1, 192)
    assert np.array_equal(plain, bound) and np.array_equal(plain, in_place)
    with pytest.raises(ValueError, match="contiguous"):
        model.run_bound(["embedding"], {"feats": torch.from_numpy(feats).transpose(0, 1), "lengths": torch.ones(2)})


# ---------------------------------------------------------------------------------------------
# AASIST

WEIGHTS = PROJECT_ROOT / "var" / "models" / "aasist"


def detector(**options) -> AasistDetector:
    return AasistDetector(WEIGHTS / "AASIST.pth", WEIGHTS / "AASIST_config.json", max_windows=1,
                          options=AasistOptions(**options))


@pytest.fixture(scope="module")
def windows(voice_dir, tmp_path_factory):
    """3 s windows (the wideband length) of genuine fixture speech and of espeak-ng speech."""
    genuine = [read(f)[:48000] for f in sorted(voice_dir.glob("*/*.wav"))[::9][:6]]
    tmp = tmp_path_factory.mktemp("espeak")
    synthetic = []
    for i, voice in enumerate(("en-us", "en-gb")):
        subprocess.run([shutil.which("espeak-ng") or "espeak-ng", "-v", voice, "-w", str(tmp / f"{i}.wav"),
                        "Please verify my identity so that I can access my account today."], check=True)
        x, rate = sf.read(tmp / f"{i}.wav", dtype="float32")
        synthetic.append(np.resize(soxr.resample(x, rate, 16000).astype(np.float32), 48000))
    return np.stack([np.resize(x, 48000) for x in genuine] + synthetic)


@pytest.fixture(scope="module")
def fp32_scores(windows):
    logits = detector().logits(windows)
    return logits[:, 1] - logits[:, 0]


def test_bfloat16_scores_stay_near_float32_and_decide_alike(windows, fp32_scores):
    logits = detector(dtype="bfloat16").logits(windows)
    bf16 = logits[:, 1] - logits[:, 0]
    # log-odds from -15.8 (espeak-ng) to +7.7; max difference measured 0.041 on these windows
    assert np.abs(bf16 - fp32_scores).max() < 0.5
    threshold = Calibrations(PROJECT_ROOT / "models" / "manifest.yaml").threshold(
        "aasist", "wideband", 0.05, "bonafide_log_odds@speech3s")
    assert list(bf16 >= threshold) == list(fp32_scores >= threshold)
    assert not all(fp32_scores >= threshold) and any(fp32_scores >= threshold)  # both decisions are met


def test_compiled_and_padded_paths_give_eager_scores(windows, fp32_scores):
    """torch.compile's path with the "eager" backend (inductor takes about 4 min on this CPU, too
    slow for the tests; bench/gpu_bench.py --part paths runs it) and batches padded to powers of
    two: the same scores as the plain network."""
    compiled = detector(compile=True, compile_backend="eager", pad_batches=True, max_batch=8)
    assert compiled.buckets() == [1, 2, 4, 8]
    compiled.warmup([48000])
    logits = compiled.logits(windows[:5])  # padded to 8
    assert logits.shape == (5, 2)
    assert np.abs((logits[:, 1] - logits[:, 0]) - fp32_scores[:5]).max() < 1e-4
    assert compiled.bucket(3) == 4 and compiled.bucket(8) == 8
    assert detector().buckets() == [1]  # unpadded on the CPU: no shapes to warm


def test_the_service_chooses_the_gpu_paths_on_cuda_only():
    from services.voice.config import VoiceConfig
    from services.voice.models import aasist_options, pipeline_config

    cfg = VoiceConfig()
    assert aasist_options(cfg, "cpu") == AasistOptions(max_batch=cfg.antispoof_batch_max)  # float32, eager, unpadded
    assert aasist_options(cfg, "cuda").pad_batches and not aasist_options(cfg, "cuda").compile
    assert aasist_options(VoiceConfig(antispoof_compile=True), "cpu").pad_batches  # compiled: fixed shapes
    assert not aasist_options(VoiceConfig(antispoof_pad_batches=False), "cuda").pad_batches
    pipe = pipeline_config(cfg, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert (pipe.device_features, pipe.io_binding, pipe.frame_buckets) == (None, None, False)  # None: by the session
