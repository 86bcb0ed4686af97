"""Operating points the calibration cannot back are refused: a tenant that selects one gets
FAILED_PRECONDITION over gRPC naming the model, channel and target, with nothing audited; a
service whose default point is unsupported does not start. Real FaceService on loopback, real
models, the project's manifest (FMR 1e-4 of mobilefacenet-arcface-192d is marked unsupported)."""

from __future__ import annotations

import shutil

import grpc
import pytest

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
from services.common.config import PROJECT_ROOT
from services.common.errors import details_of
from services.common.models import ModelStore
from services.common.storage import ConsentRecord
from tests.conftest import present

OBAMA = "barack_obama/face_recognition_examples_obama.jpg"
OBAMA2 = "barack_obama/face_recognition_examples_obama2.jpg"
MODEL = "mobilefacenet-arcface-192d"
TENANTS = {"bank-strict": {"target_fmr": 1e-4}, "bank-odd": {"target_fmr": 5e-3}}


def _settings(root, **face):
    from tests.conftest import make_settings

    manifest = root / "manifest.yaml"
    shutil.copy(PROJECT_ROOT / "models" / "manifest.yaml", manifest)
    return make_settings(root / "data", models={"manifest": str(manifest)}, face=face)


@pytest.fixture(scope="module")
def service(tmp_path_factory, face_models):
    from tests.conftest import ServiceHarness

    harness = ServiceHarness(_settings(tmp_path_factory.mktemp("face-points"), tenants=TENANTS))
    server = harness.start("face")
    yield harness, server, face_pb2_grpc.FaceServiceStub(harness.channel("face"))
    harness.stop()


def _enrol(server, stub, tenant: str, subject: str, data: bytes) -> None:
    storage = server.definition.service.rt.storage
    storage.subjects.record_consent(ConsentRecord(tenant, subject, "biometric_verification", ("face",), "v1", "test"))
    stub.Enroll(face_pb2.EnrollFaceRequest(subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject),
                                           images=[common_pb2.Image(data=data)]))


def _verify(stub, tenant: str, subject: str, data: bytes):
    return stub.Verify(face_pb2.VerifyFaceRequest(subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject),
                                                  image=common_pb2.Image(data=data)))


def _verified_events(server) -> int:
    return sum(1 for r in server.definition.service.rt.storage.audit.iter_records() if r.event_type == "face.verified")


def test_a_tenant_on_an_unsupported_point_is_refused_over_grpc(service, face_dir):
    _, server, stub = service
    record = present(ModelStore(server.settings).calibration(MODEL, "default"))
    point = record.point(1e-4)
    assert point is not None and not point.supported  # the premise: the manifest marks 1e-4 unsupported
    for tenant in ("bank-strict", "bank-default"):
        _enrol(server, stub, tenant, "c-obama", (face_dir / OBAMA).read_bytes())
    before = _verified_events(server)

    with pytest.raises(grpc.RpcError) as err:
        _verify(stub, "bank-strict", "c-obama", (face_dir / OBAMA2).read_bytes())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "OPERATING_POINT_UNSUPPORTED"
    message = err.value.details() or ""
    assert f"{MODEL} [default]: FMR 1e-4 needs >= 30,000 impostor trials" in message, message
    assert f"the calibration has {point.trials.impostor:,}" in message and "choose 3e-4" in message
    assert _verified_events(server) == before  # refused before anything was written

    # The same subject and photo under the service's default point (FMR 3e-4, supported) match.
    ok = _verify(stub, "bank-default", "c-obama", (face_dir / OBAMA2).read_bytes())
    assert ok.match and ok.threshold == pytest.approx(record.threshold(server.settings.face.target_fmr), abs=1e-6)
    assert _verified_events(server) == before + 1


def test_a_tenant_on_a_point_the_calibration_lacks_is_refused(service, face_dir):
    _, server, stub = service
    _enrol(server, stub, "bank-odd", "c-obama", (face_dir / OBAMA).read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _verify(stub, "bank-odd", "c-obama", (face_dir / OBAMA2).read_bytes())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "OPERATING_POINT_MISSING"
    assert f"{MODEL} [default]: no operating point for FMR 5e-3" in (err.value.details() or "")


@pytest.mark.parametrize("face, expected", [
    ({"target_fmr": 1e-4}, f"face.target_fmr = 0.0001: {MODEL} [default]: FMR 1e-4 needs >= 30,000 impostor trials"),
    ({"liveness_target_apcer": 1e-2},
     "face.liveness_target_apcer = 0.01: minifasnet-v2-2.7 [default]: APCER 1e-2 needs >= 300 attack presentations"),
])
def test_the_service_does_not_start_on_an_unsupported_default_point(tmp_path, face_models, face, expected):
    from services.face.server import definition

    service = definition(_settings(tmp_path, **face))
    try:
        with pytest.raises(RuntimeError) as err:
            service.warm_up()
        assert expected in str(err.value), str(err.value)
        assert service.service.pipeline is None  # refused before the models were loaded
    finally:
        service.close()
