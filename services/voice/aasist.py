"""Synthetic-speech detection: AASIST / AASIST-L (ASVspoof 2019 LA), raw 16 kHz waveform in.

Score = log-odds bona fide vs spoof (logit[1] - logit[0]; clovaai's convention: class 1 is bona
fide), higher = more likely genuine, averaged over up to ``max_windows`` windows of 64600 samples
(4.04 s; shorter audio is tiled, as in clovaai's evaluation). Trained on synthetic speech only: it
also scores reverberant genuine speech as spoof and says nothing about replays, so its threshold
must be calibrated on the channel it serves (MODELS.md).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from .aasist_net import Model

SAMPLE_RATE = 16000
Dtype = Literal["float32", "bfloat16"]


def torch_device(providers: Sequence[str]) -> str:
    """"cuda" when the configured providers put models on CUDA and torch can reach a GPU, else "cpu"."""
    return "cuda" if "CUDAExecutionProvider" in providers and torch.cuda.is_available() else "cpu"


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model config from AASIST_config.json (bare) or a clovaai .conf (under "model_config")."""
    with open(path, encoding="utf-8") as fh:
        conf = json.load(fh)
    return conf.get("model_config", conf)


@dataclass(frozen=True)
class AasistOptions:
    """The GPU options of :class:`AasistDetector` (its docstring), as the service configures them."""

    dtype: Dtype = "float32"
    compile: bool = False
    compile_backend: str = "inductor"
    pad_batches: bool = False
    max_batch: int = 1


CPU_OPTIONS = AasistOptions()


class AasistDetector:
    """AASIST on ``device``. GPU options (the defaults are the CPU's, and the calibrated scores'):
    ``dtype`` "bfloat16" runs under autocast (the weights stay float32); ``compile`` runs the
    network through torch.compile with static shapes (``compile_backend``: "inductor" generates
    kernels; "eager" only traces, which tests the path without a compiler); ``pad_batches`` pads
    every batch to a power of two of at most ``max_batch`` windows, so that with the service's fixed
    window lengths no new shape (a recompile, a new kernel plan) is met after :meth:`warmup`."""

    def __init__(self, weights: str | os.PathLike[str], config: str | os.PathLike[str],
                 threads: int | None = 1, max_windows: int = 3, device: str = "cpu",
                 options: AasistOptions = CPU_OPTIONS) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        conf = read_config(config)
        self.window = int(conf.get("nb_samp", 64600))
        self.max_windows = max_windows
        self.net = Model(conf)
        state = torch.load(Path(weights), map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.net.to(self.device).eval()
        self.options = options
        self.dtype, self.pad_batches, self.max_batch = options.dtype, options.pad_batches, options.max_batch
        self.compiled = options.compile
        self._forward: Any = (torch.compile(self.net, dynamic=False, backend=options.compile_backend)
                              if options.compile else self.net)

    def bucket(self, n: int) -> int:
        """The batch size ``n`` windows run at."""
        return min(1 << max(0, n - 1).bit_length(), max(self.max_batch, n)) if self.pad_batches else n

    def buckets(self) -> list[int]:
        """Every batch size a pass can take when batches are padded (what warm-up covers); without
        padding, one (the CPU has no per-shape cost worth a warm-up)."""
        return sorted({self.bucket(n) for n in range(1, self.max_batch + 1)}) if self.pad_batches else [1]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def logits(self, windows: NDArray[np.float32]) -> NDArray[np.float32]:
        """[N, 2] logits of [N, window] samples, on the detector's device."""
        n = len(windows)
        x = np.ascontiguousarray(windows, dtype=np.float32)
        if self.bucket(n) != n:
            x = np.concatenate([x, np.repeat(x[:1], self.bucket(n) - n, axis=0)])
        with torch.inference_mode(), self._autocast():
            _, out = self._forward(torch.from_numpy(x).to(self.device))
        return out[:n].float().cpu().numpy()

    def warmup(self, lengths: Sequence[int]) -> None:
        """One pass at every shape the service can meet: each window length at each batch bucket
        (with torch.compile, each is one compilation)."""
        if self.compiled:  # each shape is one entry of the compiled code's cache: room for all of them
            limit = len(lengths) * len(self.buckets()) + 1
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        for length in lengths:
            for b in self.buckets():
                self.logits(np.zeros((b, length), np.float32))

    def windows(self, samples: NDArray[np.float32]) -> NDArray[np.float32]:
        x = np.asarray(samples, dtype=np.float32)
        if len(x) < self.window:
            return np.tile(x, self.window // max(len(x), 1) + 1)[None, : self.window]
        n = min(self.max_windows, len(x) // self.window)
        starts = np.linspace(0, len(x) - self.window, n).astype(int) if n > 1 else [0]
        return np.stack([x[s : s + self.window] for s in starts])

    def score(self, samples: NDArray[np.float32]) -> float:
        """Bona fide log-odds of 16 kHz mono audio."""
        logits = self.logits(self.windows(samples))
        return float((logits[:, 1] - logits[:, 0]).mean())
