"""Synthetic-speech detection: AASIST / AASIST-L (ASVspoof 2019 LA), raw 16 kHz waveform in.

Score = log-odds bona fide vs spoof (logit[1] - logit[0]; clovaai's convention: class 1 is bona
fide), higher = more likely genuine, averaged over up to ``max_windows`` windows of 64600 samples
(4.04 s; shorter audio is tiled, as in clovaai's evaluation). Trained on synthetic speech only: it
also scores reverberant genuine speech as spoof and says nothing about replays, so its threshold
must be calibrated on the channel it serves (MODELS.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from .aasist_net import Model

SAMPLE_RATE = 16000


def torch_device(providers: Sequence[str]) -> str:
    """"cuda" when the configured providers put models on CUDA and torch can reach a GPU, else "cpu"."""
    return "cuda" if "CUDAExecutionProvider" in providers and torch.cuda.is_available() else "cpu"


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model config from AASIST_config.json (bare) or a clovaai .conf (under "model_config")."""
    with open(path, encoding="utf-8") as fh:
        conf = json.load(fh)
    return conf.get("model_config", conf)


class AasistDetector:
    def __init__(self, weights: str | os.PathLike[str], config: str | os.PathLike[str],
                 threads: int | None = 1, max_windows: int = 3, device: str = "cpu") -> None:
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

    def logits(self, windows: NDArray[np.float32]) -> NDArray[np.float32]:
        """[N, 2] logits of [N, window] samples, on the detector's device."""
        with torch.inference_mode():
            _, out = self.net(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()

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
