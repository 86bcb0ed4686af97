"""Red-team pass: a verifier's credential could call FaceService.Verify on one subject without end,
each answer a score to climb by (the MFA's lockout sees its own sessions only). Failed
verifications of a subject are now bounded per window (face.verify_limit); a match gives its charge
back, another subject is not touched, and erasure forgets the counter. Real models, a real server."""

from __future__ import annotations

import time

import grpc
import pytest

from challenge_frames import burst, measure_pool
from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
from services.common.errors import details_of
from services.face.service import MOVE_ENUMS
from tests.face.test_service import BIDEN, OBAMA, OBAMA2, img, ref
from tests.ops.samples import Counted


@pytest.fixture(scope="module")
def limited(tmp_path_factory, face_models):
    from tests.conftest import ServiceHarness, make_settings

    settings = make_settings(tmp_path_factory.mktemp("face-limit") / "data",
                             face={"verify_limit": {"failures": 2, "window_s": 3600},
                                   "tenants": {"bank-eval": {"verify_limit": {"failures": 0}}}})
    harness = ServiceHarness(settings)
    server = harness.start("face")
    with harness.channel("face", "dev-all") as channel:
        yield face_pb2_grpc.FaceServiceStub(channel), server.definition.service
    harness.stop()


def enrol(stub, service, subject: str, data: bytes, tenant: str = "bank-v") -> None:
    from services.common.storage import ConsentRecord

    service.rt.storage.subjects.record_consent(
        ConsentRecord(tenant, subject, "biometric_verification", ("face",), "v1", "test"))
    stub.Enroll(face_pb2.EnrollFaceRequest(subject=ref(tenant, subject), images=[img(data)], replace=True))


def test_failed_verifications_of_a_subject_are_bounded_and_a_match_costs_nothing(limited, face_dir):
    stub, service = limited
    obama, obama2, biden = ((face_dir / p).read_bytes() for p in (OBAMA, OBAMA2, BIDEN))
    enrol(stub, service, "v-1", obama)
    enrol(stub, service, "v-2", obama)

    def verify(subject: str, data: bytes) -> face_pb2.VerifyFaceResponse:
        return stub.Verify(face_pb2.VerifyFaceRequest(subject=ref("bank-v", subject), image=img(data)))

    for _ in range(3):  # matches give their charge back
        assert verify("v-1", obama2).match
    assert not verify("v-1", biden).match and not verify("v-1", biden).match  # the two failures allowed
    for probe in (biden, obama2):  # then nothing is compared, a genuine probe included
        with pytest.raises(grpc.RpcError) as err:
            verify("v-1", probe)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = details_of(err.value)
        assert details["reason"] == "VERIFY_LIMITED" and int(details["metadata"]["retry_after_s"]) > 0
    assert verify("v-2", obama2).match  # another subject is not touched

    stub.DeleteSubject(common_pb2.DeleteSubjectRequest(subject=ref("bank-v", "v-1"), reason="test"))
    enrol(stub, service, "v-1", obama)
    assert verify("v-1", obama2).match  # the erasure forgot the counter with the templates


def test_failures_and_refusals_are_counted_for_the_operators(limited, face_dir):
    """The metrics the spraying and guessing alerts read (deploy/prometheus/alerts.yaml): every
    failed comparison charged to a subject, and each refusal by the limit; a tenant without a limit
    (the evaluation tenant's impostor trials) is left out."""
    stub, service = limited
    obama, obama2, biden = ((face_dir / p).read_bytes() for p in (OBAMA, OBAMA2, BIDEN))
    enrol(stub, service, "m-1", obama)
    enrol(stub, service, "m-1", obama, tenant="bank-eval")
    failed = Counted("biogate_verify_failures_total", modality="face")
    limited_ = Counted("biogate_verify_limited_total", modality="face")

    def verify(tenant: str, data: bytes) -> face_pb2.VerifyFaceResponse:
        return stub.Verify(face_pb2.VerifyFaceRequest(subject=ref(tenant, "m-1"), image=img(data)))

    assert verify("bank-v", obama2).match and failed.delta == 0  # a match is no failure
    assert not verify("bank-v", biden).match and not verify("bank-v", biden).match
    assert (failed.delta, limited_.delta) == (2, 0)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            verify("bank-v", obama2)
        assert details_of(err.value)["reason"] == "VERIFY_LIMITED"
    assert (failed.delta, limited_.delta) == (2, 2)  # refused before any comparison: no failure
    for _ in range(3):
        assert not verify("bank-eval", biden).match
    assert (failed.delta, limited_.delta) == (2, 2)


def test_a_challenge_that_verifies_the_subject_is_bounded_and_a_bare_one_is_not(limited, face_dir, fixtures_dir):
    """SubmitLivenessChallenge with verify_subject compares the burst's face with the subject's
    template: a face that does not match is one failure like a failed Verify, and over the bound such
    a challenge is refused before its nonce is spent or anything audited. A bare liveness check
    compares nothing and is neither counted nor refused."""
    stub, service = limited
    rules = service._rules()
    pool = measure_pool(service.pipeline, sorted((fixtures_dir / "face/pad/live").glob("apfol_real_*")))
    enrol(stub, service, "ch-1", (face_dir / OBAMA).read_bytes())  # not the person of the live pool
    key, audit = service.attempts.key("bank-v", "ch-1"), service.rt.storage.audit
    move_names = {v: k for k, v in MOVE_ENUMS.items()}

    def start() -> tuple[str, list[str]]:
        r = stub.StartLivenessChallenge(face_pb2.StartLivenessChallengeRequest(subject=ref("bank-v", "ch-1")))
        return r.challenge.nonce, [move_names[m] for m in r.moves]

    def submit(nonce: str, frames: list[tuple[bytes, int]], verify: bool) -> face_pb2.SubmitLivenessChallengeResponse:
        time.sleep((frames[-1][1] - frames[0][1]) / 1000)  # the service refuses a burst older than its capture
        return stub.SubmitLivenessChallenge(face_pb2.SubmitLivenessChallengeRequest(
            subject=ref("bank-v", "ch-1"), nonce=nonce, verify_subject=verify,
            frames=[common_pb2.Frame(image=img(d), capture_time_ms=t) for d, t in frames]))

    def live_burst(moves: list[str]) -> list[tuple[bytes, int]]:
        return burst(pool, moves, rules, rules.live_threshold + 0.1)

    for _ in range(3):  # bare checks, failed ones too, compare nothing: more than the bound, none counted
        nonce, moves = start()
        out = submit(nonce, live_burst(moves[::-1]), verify=False)
        assert not out.passed and not out.match and out.score == 0 and not out.HasField("target_fmr")
    assert service.rt.storage.rate_limits.count(key, 3600) == 0

    for failures in (1, 2):  # a live burst of another face: the challenge passes, the comparison fails
        nonce, moves = start()
        out = submit(nonce, live_burst(moves), verify=True)
        assert out.challenge_passed and not out.match and not out.passed
        assert "NO_MATCH" in {x.code for x in out.reasons}
        assert service.rt.storage.rate_limits.count(key, 3600) == failures

    nonce, moves = start()
    frames = live_burst(moves)
    records = sum(1 for _ in audit.iter_records())
    with pytest.raises(grpc.RpcError) as err:
        submit(nonce, frames, verify=True)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details_of(err.value)["reason"] == "VERIFY_LIMITED"
    assert sum(1 for _ in audit.iter_records()) == records  # nothing written
    # the nonce was not spent, and a bare check over the bound is still answered
    assert submit(nonce, frames, verify=False).passed
