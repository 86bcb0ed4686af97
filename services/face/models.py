"""Configured model ids -> the face pipeline: each id is checked against the manifest by its role's
router (services/face/zoo.py), its files come verified from the model store, and the pipeline's
configuration carries the architecture and files of each.

The defaults of the configuration (services/common/config.py, FaceConfig) were chosen by
measurement on the fixtures (bench/face_eval_dev.py): YuNet (MIT) + MobileFaceNet-ArcFace
(Apache-2.0), both licence-clean; SCRFD is research-only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import cv2

from services.face.config import FaceConfig, face_config
from services.common.models import ModelStore
from services.common.models.manifest import Manifest
from services.common.modality.zoo import fetch_verified
from services.face.liveness import LivenessModelSpec
from services.face.pipeline import DetectorConfig, EmbedderConfig, FacePipeline, FacePipelineConfig
from services.face.subject import subject_policy
from services.face.zoo import DETECTORS, EMBEDDERS, LIVENESS

log = logging.getLogger("biogate.face")


def _scalar(value, default: float) -> float:
    if value is None:
        return default
    return float(value[0] if isinstance(value, list) else value)


def check_choice(manifest: Manifest, cfg: FaceConfig) -> None:
    """Every configured id names a model of its role that this service runs (else ModelChoiceError)."""
    DETECTORS.spec(manifest, cfg.detector)
    EMBEDDERS.spec(manifest, cfg.embedder)
    for model_id in cfg.liveness:
        LIVENESS.spec(manifest, model_id)


def detector_config(store: ModelStore, model_id: str, pad_ratio: float = 0.25) -> DetectorConfig:
    spec = DETECTORS.spec(store.manifest, model_id)
    return DetectorConfig(architecture=spec.architecture or "", path=store.path(model_id), pad_ratio=pad_ratio)


def embedder_config(store: ModelStore, model_id: str) -> EmbedderConfig:
    spec = EMBEDDERS.spec(store.manifest, model_id)
    pre = spec.preprocessing
    return EmbedderConfig(name=model_id, architecture=spec.architecture or "", path=store.path(model_id),
                          input_mean=_scalar(pre.mean, 127.5), input_std=_scalar(pre.std, 128.0))


def liveness_specs(store: ModelStore, model_ids: Sequence[str]) -> tuple[LivenessModelSpec, ...]:
    out = []
    for model_id in model_ids:
        spec = LIVENESS.spec(store.manifest, model_id)
        if spec.preprocessing.crop_scale is None:
            raise ValueError(f"{model_id}: the manifest gives no crop_scale")
        out.append(LIVENESS.builder(spec)(spec, store.path(model_id)))
    return tuple(out)


def pipeline_config(
    store: ModelStore,
    detector: str | None = None,
    embedders: Sequence[str] | None = None,
    liveness: Sequence[str] | None = None,
    **overrides,
) -> FacePipelineConfig:
    """The pipeline of the given model ids (default: those the store's settings configure)."""
    cfg = face_config(store.settings)
    config = FacePipelineConfig(
        detector=detector_config(store, detector or cfg.detector),
        embedders=tuple(embedder_config(store, e) for e in (embedders or (cfg.embedder,))),
        liveness=liveness_specs(store, cfg.liveness if liveness is None else liveness),
        liveness_box=cfg.liveness_box,
        subject=subject_policy(cfg),
        detector_canvas=cfg.detector_canvas,
    )
    return dataclasses.replace(config, **overrides) if overrides else config


def load_pipeline(store: ModelStore, cfg: FaceConfig, providers: Sequence[str], details: dict[str, str]) -> FacePipeline:
    """Fetch and verify the configured models, build the pipeline and run every model once.

    A missing liveness model is not fatal: the service serves without liveness and says so in
    its health details; liveness requests then fail with LIVENESS_UNAVAILABLE."""
    fetch_verified(store, [cfg.detector, cfg.embedder])
    if cfg.opencv_threads:
        cv2.setNumThreads(cfg.opencv_threads)  # the process's, before the warm-up's first parallel call
    details["opencv_threads"] = str(cv2.getNumThreads())
    liveness = list(cfg.liveness)
    if liveness:
        try:
            fetch_verified(store, liveness)
        except Exception as exc:  # noqa: BLE001 - reported, and liveness refused, below
            log.error("liveness models unavailable; serving without liveness", extra={"error": str(exc)})
            details["liveness"] = f"unavailable: {exc}"[:300]
            liveness = []
    config = pipeline_config(
        store, liveness=liveness, providers=tuple(providers), threads=cfg.intra_op_threads or None,
        batch_max=cfg.batch_max, batch_wait_ms=cfg.batch_wait_ms, batching=cfg.micro_batching,
        jpeg_decoder=cfg.jpeg_decoder,
    )
    pipeline = FacePipeline(config)
    pipeline.warmup()
    return pipeline
