"""Model ids of the manifest -> a :class:`FacePipelineConfig` of verified files in the model store.

The defaults were chosen by measurement on the fixtures (bench/face_eval_dev.py): YuNet (MIT) +
MobileFaceNet-ArcFace (Apache-2.0), both licence-clean; SCRFD is research-only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from services.common.models import ModelStore
from services.face.liveness import LivenessModelSpec
from services.face.pipeline import DetectorConfig, EmbedderConfig, FacePipelineConfig

DEFAULT_DETECTOR = "yunet-2023mar"
DEFAULT_EMBEDDERS: tuple[str, ...] = ("mobilefacenet-arcface-192d",)
DEFAULT_LIVENESS: tuple[str, ...] = ("minifasnet-v2-2.7", "minifasnet-v1se-4.0")


def _scalar(value, default: float) -> float:
    if value is None:
        return default
    return float(value[0] if isinstance(value, list) else value)


def detector_config(store: ModelStore, model_id: str, pad_ratio: float = 0.25) -> DetectorConfig:
    kind = "yunet" if model_id.startswith("yunet") else "scrfd" if model_id.startswith("scrfd") else None
    if kind is None:
        raise ValueError(f"{model_id}: not a known face detector (yunet-*, scrfd-*)")
    return DetectorConfig(kind=kind, path=store.path(model_id), pad_ratio=pad_ratio)


def embedder_config(store: ModelStore, model_id: str) -> EmbedderConfig:
    spec = store.model(model_id)
    if spec.role != "face_embedder":
        raise ValueError(f"{model_id}: role {spec.role}, not face_embedder")
    if model_id.startswith("sface"):
        return EmbedderConfig(name=model_id, kind="sface", path=store.path(model_id))
    pre = spec.preprocessing
    return EmbedderConfig(
        name=model_id,
        kind="arcface",
        path=store.path(model_id),
        input_mean=_scalar(pre.mean, 127.5),
        input_std=_scalar(pre.std, 128.0),
    )


def liveness_specs(store: ModelStore, model_ids: Sequence[str]) -> tuple[LivenessModelSpec, ...]:
    out = []
    for model_id in model_ids:
        spec = store.model(model_id)
        if spec.preprocessing.crop_scale is None:
            raise ValueError(f"{model_id}: the manifest gives no crop_scale")
        out.append(LivenessModelSpec(path=store.path(model_id), scale=float(spec.preprocessing.crop_scale)))
    return tuple(out)


def pipeline_config(
    store: ModelStore,
    detector: str = DEFAULT_DETECTOR,
    embedders: Sequence[str] = DEFAULT_EMBEDDERS,
    liveness: Sequence[str] = DEFAULT_LIVENESS,
    **overrides,
) -> FacePipelineConfig:
    config = FacePipelineConfig(
        detector=detector_config(store, detector),
        embedders=tuple(embedder_config(store, e) for e in embedders),
        liveness=liveness_specs(store, liveness),
    )
    return dataclasses.replace(config, **overrides) if overrides else config
