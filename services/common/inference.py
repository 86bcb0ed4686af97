"""ONNX Runtime sessions: one per model file, CUDA first when available, the provider in use reported."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class DeviceTensor(Protocol):
    """A contiguous array on a device that onnxruntime can read in place (a torch.Tensor)."""

    @property
    def shape(self) -> Any: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    def data_ptr(self) -> int: ...

    def is_contiguous(self) -> bool: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> Any: ...


Feed = np.ndarray | DeviceTensor


@dataclass(frozen=True)
class LoadedModel:
    session: ort.InferenceSession
    path: Path
    provider: str  # the provider that actually runs the graph, e.g. "CPUExecutionProvider"

    # On CUDA the first run of each new input shape took 0.1-5.5 s on an H100 (bench/RESULTS.md, GPU),
    # and micro-batches come in every size up to batch_max. So there the batch is padded up to a
    # power of two: log2(batch_max)+1 shapes, all of which warm-up runs.
    @property
    def pads_batches(self) -> bool:
        return self.provider == "CUDAExecutionProvider"

    def bucket(self, n: int) -> int:
        """The batch size ``n`` items are run at."""
        return 1 << max(0, n - 1).bit_length() if self.pads_batches else n

    def buckets(self, max_batch: int) -> list[int]:
        """Every batch size a run of at most ``max_batch`` items can take (what warm-up must cover)."""
        if not self.pads_batches:
            return [1]  # the CPU has no per-shape cost worth a warm-up
        return sorted({self.bucket(n) for n in range(1, max_batch + 1)})

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``session.run`` with the batch (dim 0 of every input and output) padded to :meth:`bucket`."""
        n = len(next(iter(feeds.values())))
        b = self.bucket(n)
        if b == n:
            return self.session.run(outputs, feeds)
        padded = {k: pad_batch(v, b) for k, v in feeds.items()}
        return [o[:n] for o in self.session.run(outputs, padded)]

    @property
    def device_type(self) -> str:
        """Where the session keeps its tensors: "cuda" or "cpu" (IO binding's device names)."""
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def run_bound(self, outputs: list[str], feeds: Mapping[str, Feed],
                  before_run: Callable[[], object] | None = None) -> list[np.ndarray]:
        """:meth:`run` through IO binding: inputs already on a device (torch tensors) are read where
        they are, and outputs are written on the session's device, then copied to the host once.
        On CUDA this saves the host round trip of every input; on the CPU it is the same binding
        code with the CPU device (what the tests exercise). onnxruntime runs on its own CUDA stream:
        ``before_run``, called once the inputs are padded, waits for the stream that wrote them."""
        n = len(next(iter(feeds.values())))
        b = self.bucket(n)
        binding = self.session.io_binding()
        kept: list[Feed] = []  # padded copies must outlive the run
        for name, value in feeds.items():
            if b != n:
                value = value[list(range(n)) + [0] * (b - n)]  # pad_batch, for numpy and torch alike
            if isinstance(value, np.ndarray):
                value = np.ascontiguousarray(value)
                kept.append(value)
                binding.bind_cpu_input(name, value)
                continue
            kept.append(value)
            if not value.is_contiguous():
                raise ValueError(f"input {name!r}: a device tensor must be contiguous")
            device = value.device
            binding.bind_input(name, device_type=device.type, device_id=device.index or 0,
                               element_type=np.dtype(str(value.dtype).removeprefix("torch.")),
                               shape=tuple(value.shape), buffer_ptr=value.data_ptr())
        for name in outputs:
            binding.bind_output(name, self.device_type)
        if before_run is not None:
            before_run()
        self.session.run_with_iobinding(binding)
        return [o[:n] for o in binding.copy_outputs_to_cpu()]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


def pad_batch(x: np.ndarray, b: int) -> np.ndarray:
    """``x`` with rows repeated from its first up to ``b`` rows (a valid input for any model)."""
    return x if len(x) >= b else np.concatenate([x, np.repeat(x[:1], b - len(x), axis=0)])


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
