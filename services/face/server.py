"""FaceService wiring: the gRPC servicer, the warm-up that loads the models, and the service
definition for the bootstrap. The RPCs themselves are in :mod:`services.face.service`."""

from __future__ import annotations

import logging

from services.common import subjects
from services.common.api.v1 import face_pb2, face_pb2_grpc
from services.common.config import Settings
from services.common.metrics import MODEL_INFO
from services.common.runtime import Runtime
from services.common.server.bootstrap import ServiceDefinition
from services.face.models import pipeline_config
from services.face.pipeline import FacePipeline
from services.face.service import FaceService
from services.face.subject import SubjectPolicy

log = logging.getLogger("biogate.face")


class FaceServicer(face_pb2_grpc.FaceServiceServicer):
    def __init__(self, rt: Runtime, service: FaceService) -> None:
        self.rt = rt
        self.service = service

    def Enroll(self, request, context):
        return self.service.enroll(request)

    def Verify(self, request, context):
        return self.service.verify(request)

    def Identify(self, request, context):
        return self.service.identify(request)

    def CheckLiveness(self, request, context):
        return self.service.check_liveness(request)

    def StartLivenessChallenge(self, request, context):
        return self.service.start_challenge(request)

    def SubmitLivenessChallenge(self, request, context):
        return self.service.submit_challenge(request)

    def GetEnrollment(self, request, context):
        return subjects.get_enrollment(self.rt, request, "face")

    def DeleteSubject(self, request, context):
        response = subjects.delete_modality(self.rt, request, "face")
        self.service.deleted(request.subject.tenant_id, request.subject.subject_id)
        return response


def load_pipeline(rt: Runtime, details: dict[str, str]) -> FacePipeline:
    """Fetch and verify the configured models, build the pipeline and run every model once.

    A missing liveness model is not fatal: the service serves without liveness and says so in
    its health details; liveness requests then fail with LIVENESS_UNAVAILABLE."""
    cfg = rt.settings.face
    core = [cfg.detector, cfg.embedder]
    for model_id in core:
        if not rt.models.model(model_id).active:
            raise RuntimeError(f"face model {model_id} is marked inactive in the manifest")
    rt.models.fetch(core)
    problems = rt.models.verify(core)
    if problems:
        raise RuntimeError("; ".join(str(p) for p in problems))
    liveness = list(cfg.liveness)
    if liveness:
        try:
            rt.models.fetch(liveness)
            problems = rt.models.verify(liveness)
            if problems:
                raise RuntimeError("; ".join(str(p) for p in problems))
        except Exception as exc:  # noqa: BLE001 - reported, and liveness refused, below
            log.error("liveness models unavailable; serving without liveness", extra={"error": str(exc)})
            details["liveness"] = f"unavailable: {exc}"[:300]
            liveness = []
    config = pipeline_config(
        rt.models,
        detector=cfg.detector,
        embedders=(cfg.embedder,),
        liveness=liveness,
        providers=tuple(rt.settings.models.providers),
        threads=cfg.intra_op_threads or None,
        batch_max=cfg.batch_max,
        batch_wait_ms=cfg.batch_wait_ms,
        subject=SubjectPolicy(second_face_ratio=cfg.second_face_ratio),
    )
    pipeline = FacePipeline(config)
    pipeline.warmup()
    return pipeline


def definition(settings: Settings) -> ServiceDefinition:
    rt = Runtime.open(settings)
    service = FaceService(rt, settings.face)
    servicer = FaceServicer(rt, service)

    def close() -> None:
        service.close()
        rt.close()

    result = ServiceDefinition(
        name="face",
        descriptors=[face_pb2.DESCRIPTOR.services_by_name["FaceService"]],
        register=lambda server: face_pb2_grpc.add_FaceServiceServicer_to_server(servicer, server),
        close=close,
    )

    def warm_up() -> None:
        details: dict[str, str] = {}
        service.check_operating_points()
        pipeline = load_pipeline(rt, details)
        cfg = settings.face
        models = [cfg.detector, cfg.embedder, *(cfg.liveness if pipeline.liveness is not None else [])]
        details["models"] = ",".join(models)
        details.update({f"provider.{k}": v for k, v in pipeline.providers.items()})
        details.setdefault("liveness", "available" if pipeline.liveness is not None else "not configured")
        calibrated = [m for m in (cfg.embedder, *cfg.liveness) if service.calibrations.record(m) is not None]
        details["calibrated"] = ",".join(calibrated) or "none"
        service.pipeline = pipeline
        result.details.update(details)
        MODEL_INFO.info({f"face_{k.replace('.', '_').replace(':', '_').replace('-', '_')}": v for k, v in details.items()})
        log.info("face models ready", extra=details)

    result.warm_up = warm_up
    result.service = service  # type: ignore[attr-defined]  # for tests and benchmarks in-process
    return result
