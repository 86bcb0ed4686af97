"""SFace (OpenCV Zoo, 2021dec) 128-d face embedder.

Input: RGB, 0..255, no normalisation, 112x112 aligned crop. The published file has a fixed batch
of 1 (and lists its initializers as graph inputs); :func:`make_batchable` writes the copy with a
symbolic batch dimension, and :class:`SFaceEmbedder` runs either (the batch-1 file in a loop).
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from services.common.inference import DEFAULT_PROVIDERS, create_session
from services.face.embedding import fixed_batch, l2_normalise, run_batched, to_rgb_nchw


class SFaceEmbedder:
    def __init__(self, model_path: str | os.PathLike[str], max_batch: int = 64, providers=DEFAULT_PROVIDERS) -> None:
        self.model = create_session(model_path, providers)
        self.provider = self.model.provider
        self.max_batch = fixed_batch(self.model) or max_batch
        self.dim = int(self.model.session.get_outputs()[0].shape[-1])

    def embed(self, aligned_batch: np.ndarray) -> np.ndarray:
        blob = to_rgb_nchw(aligned_batch, 0.0, 1.0)
        return l2_normalise(run_batched(self.model, blob, self.max_batch))


def make_batchable(src: str | os.PathLike[str], dst: str | os.PathLike[str], batch_dim: str = "N") -> None:
    """Write a copy of a fixed-batch model whose batch dimension is symbolic.

    Initializers are removed from ``graph.input`` (otherwise they are overridable inputs and the
    shapes cannot be re-inferred) and dim 0 of every graph input and output is named.
    """
    model = onnx.load(str(src))
    init_names = {t.name for t in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = batch_dim
    del model.graph.value_info[:]  # stale batch-1 intermediate shapes
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
