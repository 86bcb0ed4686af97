"""The face service's metrics as its real models produce them (models tier): the raw similarity of
each comparison, liveness refusals by RPC, and the batch sizes and model calls of its batchers."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
from services.common.storage import ConsentRecord
from tests.ops.samples import Counted

LIVE = "face/pad/live/apfol_real_10.png"
SPOOF = "face/pad/spoof/apfol_fake_0.png"


def test_comparisons_liveness_refusals_and_model_calls_are_recorded(services, fixtures_dir):
    server = services.start("face")
    service = server.definition.service
    service.rt.storage.subjects.record_consent(ConsentRecord("ops-bank", "c-ops", "biometric_verification", ("face",),
                                                             "v1", "test"))
    live, spoof = ((fixtures_dir / p).read_bytes() for p in (LIVE, SPOOF))
    ref = common_pb2.SubjectRef(tenant_id="ops-bank", subject_id="c-ops")
    model, channel = service.model_id, service.cfg.calibration_channel
    matched = Counted("biogate_similarity_score_count", model=model, channel=channel, result="match")
    refused_verify = Counted("biogate_face_liveness_refusals_total", rpc="verify")
    refused_check = Counted("biogate_face_liveness_refusals_total", rpc="check_liveness")
    embed_calls = Counted("biogate_inference_seconds_count", model=f"embed-{model}")
    liveness_items = Counted("biogate_batch_size_sum", model="liveness")

    with services.channel("face") as channel_:
        stub = face_pb2_grpc.FaceServiceStub(channel_)
        stub.Enroll(face_pb2.EnrollFaceRequest(subject=ref, images=[common_pb2.Image(data=live)]))
        ok = stub.Verify(face_pb2.VerifyFaceRequest(subject=ref, image=common_pb2.Image(data=live), require_liveness=True))
        bad = stub.Verify(face_pb2.VerifyFaceRequest(subject=ref, image=common_pb2.Image(data=spoof), require_liveness=True))
        check = stub.CheckLiveness(face_pb2.CheckLivenessRequest(tenant_id="ops-bank", image=common_pb2.Image(data=spoof)))

    assert ok.match and ok.live and not bad.live and not check.live
    assert matched.delta == 1 + (bad.score >= bad.threshold)  # similarity decides the label, not liveness
    assert REGISTRY.get_sample_value("biogate_similarity_score_sum",
                                     {"model": model, "channel": channel, "result": "match"}) is not None
    assert (refused_verify.delta, refused_check.delta) == (1, 1)
    assert embed_calls.delta >= 3  # enrolment and two verifications: one call each at least
    assert liveness_items.delta >= 3  # two verifications and one check: a crop each at least
