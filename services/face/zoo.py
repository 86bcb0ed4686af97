"""The face model zoo: one router per role maps a manifest entry's ``architecture`` to the module that
runs it (yunet.py, scrfd.py, sface.py, arcface.py, liveness.py). The pipeline builds its models
through these routers only; :mod:`services.face.models` turns configured model ids into the
pipeline's configuration.
"""

from __future__ import annotations

from typing import Callable

from services.common.modality.zoo import Router
from services.face.arcface import ArcFaceEmbedder
from services.face.detection import Detector
from services.face.embedding import Embedder
from services.face.liveness import LivenessModelSpec
from services.face.scrfd import ScrfdDetector
from services.face.sface import SFaceEmbedder
from services.face.yunet import YuNetDetector


def _detector(cls):
    def build(cfg, **runtime):
        extra = {} if cfg.score_threshold is None else {"score_threshold": cfg.score_threshold}
        return cls(cfg.path, pad_ratio=cfg.pad_ratio, **extra, **runtime)

    return build


DETECTORS: Router[Callable[..., Detector]] = Router("face_detector", "face.detector", {
    "yunet": _detector(YuNetDetector),
    "scrfd": _detector(ScrfdDetector),
})
EMBEDDERS: Router[Callable[..., Embedder]] = Router("face_embedder", "face.embedder", {
    "sface": lambda cfg, **runtime: SFaceEmbedder(cfg.path, **runtime),
    "arcface-onnx": lambda cfg, **runtime: ArcFaceEmbedder(
        cfg.path, input_mean=cfg.input_mean, input_std=cfg.input_std, **runtime),
})
# One model of the passive-liveness ensemble: its file and the crop scale it was trained on.
LIVENESS = Router("face_liveness", "face.liveness", {
    "minifasnet": lambda spec, path: LivenessModelSpec(path=path, scale=float(spec.preprocessing.crop_scale)),
})
