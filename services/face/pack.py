"""Operator-supplied InsightFace model packs (e.g. buffalo_l), read with insightface's conventions.

A pack is a directory of ONNX files (``<root>/models/<name>/*.onnx`` for ``FaceAnalysis(name,
root)``, or the directory itself). insightface's ``model_zoo`` routes each file by its graph
(a detector has >= 5 outputs, a recogniser a square input of at least 112) and, for a
recogniser, reads its input normalisation from the graph; the first detector and the first
recogniser in file-name order are used, as ``FaceAnalysis`` does. BioGate then runs them with its
own detector/embedder classes (letterboxed detection, shared sessions, micro-batching).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from insightface.model_zoo import get_model

from services.face.pipeline import DetectorConfig, EmbedderConfig


@dataclass(frozen=True)
class InsightFacePack:
    directory: Path
    detector: DetectorConfig
    recogniser: EmbedderConfig | None


def pack_directory(name: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """``FaceAnalysis``'s lookup: ``name`` itself when it is a directory, else ``<root>/models/<name>``."""
    direct = Path(name).expanduser()
    if direct.is_dir():
        return direct.resolve()
    if root is None:
        raise FileNotFoundError(f"no model pack directory {name!s}")
    d = Path(root).expanduser() / "models" / str(name)
    if not d.is_dir():
        raise FileNotFoundError(f"no model pack {name!s} under {root!s}/models")
    return d.resolve()


def load_pack(name: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, pad_ratio: float = 0.25) -> InsightFacePack:
    directory = pack_directory(name, root)
    detector: DetectorConfig | None = None
    recogniser: EmbedderConfig | None = None
    for f in sorted(glob.glob(str(directory / "*.onnx"))):
        model = get_model(f, providers=["CPUExecutionProvider"])
        task = getattr(model, "taskname", None)
        if task == "detection" and detector is None and model.use_kps:
            detector = DetectorConfig(architecture="scrfd", path=f, pad_ratio=pad_ratio)
        elif task == "recognition" and recogniser is None:
            recogniser = EmbedderConfig(
                name=f"{directory.name}:{Path(f).stem}",
                architecture="arcface-onnx",
                path=f,
                input_mean=float(model.input_mean),
                input_std=float(model.input_std),
            )
        del model
    if detector is None:
        raise ValueError(f"{directory}: no SCRFD/RetinaFace detector with landmarks in the pack")
    return InsightFacePack(directory=directory, detector=detector, recogniser=recogniser)
