"""ArcFace-style ONNX embedders: the MobileFaceNet-ArcFace 192-d model and any InsightFace recogniser.

Input: RGB, (x - mean) / std, 112x112 aligned crop. MobileFaceNet (sirius-ai) was trained with
mean 127.5, std 128; InsightFace's packs use 127.5 / 127.5 (``insightface.model_zoo`` reports the
right pair for a pack's file, see :mod:`services.face.pack`).
"""

from __future__ import annotations

import os

import numpy as np

from services.common.inference import DEFAULT_PROVIDERS, create_session
from services.face.embedding import fixed_batch, l2_normalise, run_batched, to_rgb_nchw


class ArcFaceEmbedder:
    def __init__(
        self,
        model_path: str | os.PathLike[str],
        input_mean: float = 127.5,
        input_std: float = 128.0,
        max_batch: int = 64,
        providers=DEFAULT_PROVIDERS,
        threads: int | None = None,
    ) -> None:
        self.model = create_session(model_path, providers, threads)
        self.provider = self.model.provider
        shape = self.model.session.get_inputs()[0].shape
        if shape[2:] != [112, 112]:
            raise ValueError(f"{model_path}: expected a 112x112 input, got {shape}")
        self.max_batch = fixed_batch(self.model) or max_batch
        self.dim = int(self.model.session.get_outputs()[0].shape[-1])
        self.input_mean = input_mean
        self.input_std = input_std

    def embed(self, aligned_batch: np.ndarray) -> np.ndarray:
        blob = to_rgb_nchw(aligned_batch, self.input_mean, self.input_std)
        return l2_normalise(run_batched(self.model, blob, self.max_batch))
