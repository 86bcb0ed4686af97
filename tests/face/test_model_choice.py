"""The manifest chooses the models: switching face.embedder to another manifest entry is a
configuration change. SFace is calibrated here on LFW identities (face/identities) and then enrols
and verifies other people (face/verification) through a real FaceService."""

from __future__ import annotations

import csv
import itertools
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from face_helpers import CPU
from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
from services.common.config import PROJECT_ROOT
from services.common.errors import details_of
from services.common.evaluation.calibration import calibration_record
from services.common.models import ModelStore
from services.common.storage import ConsentRecord, TemplateRecord
from services.face.evaluation import FaceVerificationScorer
from services.face.models import pipeline_config
from services.face.pipeline import FacePipeline

SFACE = "sface-2021dec-batch"
PEOPLE = 40  # x 4 photos: 240 genuine and 12,480 impostor pairs, enough for FMR 1e-2 (and 1e-3)


def _identity_scores(store: ModelStore, fixtures_dir) -> tuple[np.ndarray, np.ndarray]:
    root = fixtures_dir / "face" / "identities"
    with open(root / "SOURCES.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    people = sorted({r["identity"] for r in rows})[:PEOPLE]
    photos = [(r["identity"], root / r["path"]) for r in rows if r["identity"] in people]
    pipeline = FacePipeline(pipeline_config(store, embedders=(SFACE,), liveness=(), providers=CPU))
    try:
        scorer = FaceVerificationScorer(pipeline)
        # two photos at a time: each model call runs on one thread
        with ThreadPoolExecutor(2) as pool:
            analysed = list(pool.map(scorer.embeddings, [p for _, p in photos]))
        embedded = [(who, e[SFACE]) for (who, _), e in zip(photos, analysed, strict=True) if isinstance(e, dict)]
    finally:
        pipeline.close()
    genuine: list[float] = []
    impostor: list[float] = []
    for (a, x), (b, y) in itertools.combinations(embedded, 2):
        (genuine if a == b else impostor).append(float(x @ y))
    return np.array(genuine), np.array(impostor)


@pytest.fixture(scope="module")
def sface_service(tmp_path_factory, face_models, model_store, fixtures_dir):
    from tests.conftest import ServiceHarness, make_settings

    root = tmp_path_factory.mktemp("face-sface")
    manifest = root / "manifest.yaml"
    shutil.copy(PROJECT_ROOT / "models" / "manifest.yaml", manifest)
    settings = make_settings(root / "data", models={"manifest": str(manifest)},
                             face={"embedder": SFACE, "target_fmr": 1e-2})
    genuine, impostor = _identity_scores(model_store, fixtures_dir)
    record = calibration_record(genuine, impostor, target_fmrs=[1e-2, 1e-3], score_name="cosine",
                                dataset=f"fixtures face/identities, {PEOPLE} people x 4 (LFW), all pairs")
    ModelStore(settings).update_calibration(SFACE, "default", record)
    point = next(p for p in record["operating_points"] if p["target_fmr"] == 1e-2)
    print(f"{SFACE} on {record['trials']}: FMR 1e-2 at cosine {point['threshold']:.4f} (FNMR {point['fnmr']:.4f})")
    harness = ServiceHarness(settings)
    server = harness.start("face")
    yield harness, server.definition.service
    harness.stop()


def test_the_configured_embedder_enrols_and_verifies_through_the_service(sface_service, face_dir):
    harness, service = sface_service
    stub = face_pb2_grpc.FaceServiceStub(harness.channel("face"))
    ref = common_pb2.SubjectRef(tenant_id="bank-sf", subject_id="c-obama")
    service.rt.storage.subjects.record_consent(ConsentRecord("bank-sf", "c-obama", "biometric_verification",
                                                             ("face",), "v1", "test"))

    def image(name):
        return common_pb2.Image(data=(face_dir / name).read_bytes())

    enrolled = stub.Enroll(face_pb2.EnrollFaceRequest(
        subject=ref, images=[image("barack_obama/face_recognition_examples_obama.jpg")]))
    assert enrolled.template.model_id == SFACE and enrolled.template.model_active
    rec = service.rt.storage.templates.get("bank-sf", "c-obama", "face", SFACE)
    assert service.vault.open(rec).shape == (128,)  # SFace's dimension, from the template header
    genuine = stub.Verify(face_pb2.VerifyFaceRequest(subject=ref, image=image("barack_obama/face_recognition_examples_obama2.jpg")))
    impostor = stub.Verify(face_pb2.VerifyFaceRequest(
        subject=ref, image=image("joe_biden/face_recognition_examples_knn_examples_train_biden_biden.jpg")))
    threshold = service.calibrations.threshold(SFACE, "default", 1e-2)
    assert genuine.model_id == impostor.model_id == SFACE
    assert genuine.threshold == pytest.approx(threshold) and genuine.match and not impostor.match
    assert genuine.score > threshold > impostor.score
    print(f"genuine {genuine.score:.4f}, impostor {impostor.score:.4f}, threshold {threshold:.4f}")
    health = harness.running["face"].definition.details
    assert SFACE in health["models"] and SFACE in health["calibrated"]

    # A template of the previously configured embedder does not open for the new one.
    other = common_pb2.SubjectRef(tenant_id="bank-sf", subject_id="c-legacy")
    service.rt.storage.subjects.record_consent(ConsentRecord("bank-sf", "c-legacy", "biometric_verification",
                                                             ("face",), "v1", "test"))
    envelope, key_id = service.vault.seal("bank-sf", "c-legacy", "mobilefacenet-arcface-192d", np.ones(192, np.float32))
    service.rt.storage.templates.put(TemplateRecord("bank-sf", "c-legacy", "face", "mobilefacenet-arcface-192d", "",
                                                    envelope, key_id, 1))
    with pytest.raises(grpc.RpcError) as info:
        stub.Verify(face_pb2.VerifyFaceRequest(subject=other, image=image("barack_obama/face_recognition_examples_obama2.jpg")))
    assert (info.value.code(), details_of(info.value)["reason"]) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                     "TEMPLATE_MODEL_INACTIVE")
