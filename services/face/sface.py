"""SFace (OpenCV Zoo, 2021dec) 128-d face embedder.

Input: RGB, 0..255, no normalisation, 112x112 aligned crop. The published file has a fixed batch
of 1 and runs in a loop; the model store's ``sface-2021dec-batch`` (initializers out of
graph.input, dim 0 named) takes whole batches and gives the same embeddings.
"""

from __future__ import annotations

import os

import numpy as np

from services.common.inference import DEFAULT_PROVIDERS, create_session
from services.face.embedding import fixed_batch, l2_normalise, run_batched, to_rgb_nchw


class SFaceEmbedder:
    def __init__(self, model_path: str | os.PathLike[str], max_batch: int = 64, providers=DEFAULT_PROVIDERS,
                 threads: int | None = None) -> None:
        self.model = create_session(model_path, providers, threads)
        self.provider = self.model.provider
        self.max_batch = fixed_batch(self.model) or max_batch
        self.dim = int(self.model.session.get_outputs()[0].shape[-1])

    def embed(self, aligned_batch: np.ndarray) -> np.ndarray:
        blob = to_rgb_nchw(aligned_batch, 0.0, 1.0)
        return l2_normalise(run_batched(self.model, blob, self.max_batch))
