"""ONNX Runtime sessions: one per model file, CUDA first when available, the provider in use reported."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnxruntime as ort

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class LoadedModel:
    session: ort.InferenceSession
    path: Path
    provider: str  # the provider that actually runs the graph, e.g. "CPUExecutionProvider"

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


def create_session(
    path: str | os.PathLike[str],
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int | None = None,
) -> LoadedModel:
    """Open an ONNX model with the first available of ``providers`` (CPU is always appended)."""
    available = set(ort.get_available_providers())
    wanted = [p for p in providers if p in available]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    if "CUDAExecutionProvider" in wanted and hasattr(ort, "preload_dlls"):
        # cuDNN / cuBLAS come as pip packages beside onnxruntime-gpu; make them findable first.
        ort.preload_dlls()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    provider = session.get_providers()[0]
    log.info("model loaded", extra={"model_file": Path(path).name, "provider": provider})
    return LoadedModel(session=session, path=Path(path), provider=provider)
