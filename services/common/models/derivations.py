"""Deterministic recipes that compute a model file from another one. The store checks the result
against the manifest's sha256, so a recipe that drifts (another onnx or tflite2onnx version)
fails loudly instead of yielding a silently different model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import SourceUnavailable


def _set_batch_dim(value_info, name: str) -> None:
    value_info.type.tensor_type.shape.dim[0].dim_param = name


def onnx_batchable(src: Path, out: Path, params: dict[str, Any]) -> None:
    """Drop initializers from graph.input and give dim 0 of the named tensors a symbolic name.

    Old exporters list every weight as a graph input; ONNX Runtime then cannot fold them as
    constants, and a fixed dim 0 of 1 forbids batches. ``dims`` ({tensor: {index: name}}) names
    further dims, e.g. a fully convolutional detector's height and width (ONNX Runtime refuses an
    input whose fixed dims differ) and the anchor counts of its outputs that follow from them;
    the exporter's value_info, inferred for the fixed dims, then goes (ONNX Runtime infers it again).
    """
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    kept = [i for i in graph.input if i.name not in initializers]
    del graph.input[:]
    graph.input.extend(kept)
    batch = params.get("batch_dim", "N")
    by_name = {v.name: v for v in list(graph.input) + list(graph.output)}
    for tensor in params.get("tensors", []):
        if tensor not in by_name:
            raise SourceUnavailable(f"onnx_batchable: {src.name} has no graph input/output {tensor!r}")
        _set_batch_dim(by_name[tensor], batch)
    if params.get("dims"):
        del graph.value_info[:]
    for tensor, names in params.get("dims", {}).items():
        if tensor not in by_name:
            raise SourceUnavailable(f"onnx_batchable: {src.name} has no graph input/output {tensor!r}")
        shape = by_name[tensor].type.tensor_type.shape
        for index, name in names.items():
            shape.dim[int(index)].dim_param = str(name)
    out.write_bytes(model.SerializeToString())


def tflite_to_onnx(src: Path, out: Path, params: dict[str, Any]) -> None:
    """Convert with tflite2onnx, then make the batch dynamic and the byte layout canonical.

    tflite2onnx bakes the TFLite file's fixed batch into the graph and orders initializers and
    value_info by Python set iteration (it changes with PYTHONHASHSEED). The patch: Reshape targets
    whose first element is that batch become -1, value_info entries carrying the batch go (ONNX
    Runtime infers them again), graph inputs/outputs get a symbolic dim 0, and initializers and
    value_info are sorted by name.
    """
    try:
        import tflite2onnx
    except ImportError:
        raise SourceUnavailable("tflite_to_onnx needs the tflite2onnx package, which is not installed") from None
    import numpy as np
    import onnx
    from onnx import numpy_helper

    tlog = logging.getLogger("tflite2onnx")
    level = tlog.level
    tlog.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            converted = Path(tmp) / "converted.onnx"
            tflite2onnx.convert(str(src), str(converted))
            model = onnx.load(str(converted))
    finally:
        tlog.setLevel(level)

    graph = model.graph
    fixed = graph.input[0].type.tensor_type.shape.dim[0].dim_value
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            shape = numpy_helper.to_array(tensor).copy()
            if shape.size and shape[0] == fixed:
                shape[0] = -1
                tensor.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), tensor.name))
    value_info = sorted(
        (v for v in graph.value_info if v.type.tensor_type.shape.dim[0].dim_value != fixed),
        key=lambda v: v.name,
    )
    ordered_inits = [onnx.TensorProto() for _ in graph.initializer]
    for copy, tensor in zip(ordered_inits, sorted(graph.initializer, key=lambda t: t.name), strict=True):
        copy.CopyFrom(tensor)
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    del graph.initializer[:]
    graph.initializer.extend(ordered_inits)
    batch = params.get("batch_dim", "N")
    for v in list(graph.input) + list(graph.output):
        _set_batch_dim(v, batch)
    if "producer_name" in params:
        model.producer_name = params["producer_name"]
    out.write_bytes(model.SerializeToString())


RECIPES: dict[str, Callable[[Path, Path, dict[str, Any]], None]] = {
    "onnx_batchable": onnx_batchable,
    "tflite_to_onnx": tflite_to_onnx,
}


def derive(recipe: str, src: Path, out: Path, params: dict[str, Any]) -> None:
    try:
        RECIPES[recipe](src, out, params)
    except SourceUnavailable:
        raise
    except Exception as err:  # a converter's own failure: the store goes on to the next source
        raise SourceUnavailable(f"recipe {recipe} failed on {src.name}: {type(err).__name__}: {err}") from err
