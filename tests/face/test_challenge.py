"""Active liveness challenge over gRPC: a genuine burst following the random moves passes; the
wrong order, a repeated frame, another person in the middle, spoof frames, bad timing, a reused
and an expired nonce are refused."""

from __future__ import annotations

import time
from datetime import timedelta

import grpc
import pytest

from challenge_frames import burst, measure_pool
from services.common.api.v1 import common_pb2, face_pb2
from services.common.errors import details_of
from services.common.storage import ChallengeRecord
from services.common.storage.db import utcnow
from services.face.challenge import ChallengeRules, label, trajectory
from services.face.service import CHALLENGE_KIND, MOVE_ENUMS

MOVE_NAMES = {v: k for k, v in MOVE_ENUMS.items()}
TENANT = "bank-c"


@pytest.fixture(scope="module")
def pools(face_service, fixtures_dir):
    pipeline = face_service.service.pipeline
    live = measure_pool(pipeline, sorted((fixtures_dir / "face/pad/live").glob("apfol_real_*")))
    spoof = measure_pool(pipeline, sorted((fixtures_dir / "face/pad/spoof").glob("apfol_fake_*")))
    return live, spoof


@pytest.fixture(scope="module")
def rules(face_service):
    return face_service.service._rules()


@pytest.fixture(scope="module")
def live_min(rules):
    return rules.live_threshold + 0.1  # clear bona fide frames, as a live capture gives


def start(s, subject):
    r = s.stub.StartLivenessChallenge(face_pb2.StartLivenessChallengeRequest(
        subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=subject)))
    return r, [MOVE_NAMES[m] for m in r.moves]


def submit(s, subject, nonce, frames, verify=False):
    # A camera needs the burst's duration to capture it: the service refuses older bursts.
    time.sleep(max(0, frames[-1][1] - frames[0][1]) / 1000)
    return s.stub.SubmitLivenessChallenge(face_pb2.SubmitLivenessChallengeRequest(
        subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=subject), nonce=nonce, verify_subject=verify,
        frames=[common_pb2.Frame(image=common_pb2.Image(data=d), capture_time_ms=t) for d, t in frames]))


def codes(r):
    return {x.code for x in r.reasons}


def test_start_gives_a_fresh_random_sequence(face_service):
    seen = set()
    for i in range(12):
        r, moves = start(face_service, f"c-start-{i}")
        assert len(moves) == 3 and len(set(moves)) == 3 and r.min_frames <= r.max_frames
        assert timedelta(0) < r.challenge.expires_at.ToDatetime() - utcnow().replace(tzinfo=None) <= timedelta(seconds=60)
        seen.add(tuple(moves))
    assert len(seen) > 3  # 24 possible sequences


def test_a_genuine_burst_passes_and_its_nonce_is_single_use(face_service, pools, rules, live_min, fixtures_dir):
    s = face_service
    subject = "c-genuine"
    s.consent(TENANT, subject)
    r, moves = start(s, subject)
    frames = burst(pools[0], moves, rules, live_min)
    # Enrolled from the first frame: the burst also verifies the subject.
    s.stub.Enroll(face_pb2.EnrollFaceRequest(subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=subject),
                                             images=[common_pb2.Image(data=frames[0][0])]))
    out = submit(s, subject, r.challenge.nonce, frames, verify=True)
    assert out.passed and out.match and out.challenge_passed and not out.reasons, codes(out)
    assert out.score > 0 and out.model_id
    assert out.target_fmr == pytest.approx(s.settings.face.target_fmr) and out.HasField("measured_fmr")
    assert out.liveness_target_apcer == pytest.approx(s.settings.face.liveness_target_apcer)
    last = [x for x in s.storage.audit.iter_records() if x.event_type == "face.challenge_submitted"][-1]
    assert '"live_median"' in last.details and '"passed":true' in last.details  # scores: audit only

    with pytest.raises(grpc.RpcError) as err:
        submit(s, subject, r.challenge.nonce, frames)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and details_of(err.value)["reason"] == "CHALLENGE_USED"


@pytest.mark.parametrize("seed", range(3))
def test_genuine_bursts_pass_for_any_sequence(face_service, pools, rules, live_min, seed):
    r, moves = start(face_service, f"c-any-{seed}")
    out = submit(face_service, f"c-any-{seed}", r.challenge.nonce, burst(pools[0], moves, rules, live_min))
    assert out.passed, (moves, codes(out))


def test_wrong_order_is_refused(face_service, pools, rules, live_min):
    r, moves = start(face_service, "c-order")
    out = submit(face_service, "c-order", r.challenge.nonce, burst(pools[0], moves[::-1], rules, live_min))
    assert not out.challenge_passed and not out.HasField("target_fmr")  # no match asked, none stated
    assert not out.passed and "MOVES_NOT_FOLLOWED" in codes(out)


def test_a_single_repeated_frame_is_refused(face_service, pools, rules, live_min):
    r, moves = start(face_service, "c-repeat")
    first = burst(pools[0], moves, rules, live_min)[0][0]
    frames = [(first, 1000 + 120 * i) for i in range(10)]
    out = submit(face_service, "c-repeat", r.challenge.nonce, frames)
    assert not out.passed and {"DUPLICATE_FRAMES", "MOVES_NOT_FOLLOWED"} <= codes(out)


def test_another_person_in_the_middle_is_refused(face_service, pools, rules, live_min, fixtures_dir):
    r, moves = start(face_service, "c-swap")
    frames = burst(pools[0], moves, rules, live_min)
    other = (fixtures_dir / "face/pad/live/silentface_image_T1.jpg").read_bytes()  # bona fide, another person
    middle = len(frames) // 2
    frames[middle] = (other, frames[middle][1])
    out = submit(face_service, "c-swap", r.challenge.nonce, frames)
    assert not out.passed and "IDENTITY_CHANGED" in codes(out)


def test_frames_from_the_spoof_set_are_refused(face_service, pools, rules):
    r, moves = start(face_service, "c-spoof")
    out = submit(face_service, "c-spoof", r.challenge.nonce, burst(pools[1], moves, rules))
    assert not out.passed and "LIVENESS_FAILED" in codes(out)


def test_implausible_timing_is_refused(face_service, pools, rules, live_min):
    r, moves = start(face_service, "c-time")
    frames = [(d, 1000) for d, _ in burst(pools[0], moves, rules, live_min)]  # all at the same instant
    out = submit(face_service, "c-time", r.challenge.nonce, frames)
    assert not out.passed and "TIMING_IMPLAUSIBLE" in codes(out)


def test_expired_unknown_and_foreign_nonces_are_refused(face_service, pools, rules, live_min):
    s = face_service
    now = utcnow()
    old = s.storage.challenges.create(ChallengeRecord(
        TENANT, "c-late", CHALLENGE_KIND, {"moves": ["TURN_LEFT", "TURN_RIGHT", "LOOK_UP"], "issued_at": (now - timedelta(seconds=61)).isoformat()},
        expires_at=now - timedelta(seconds=1), created_at=now - timedelta(seconds=61)))
    frames = burst(pools[0], ["TURN_LEFT", "TURN_RIGHT", "LOOK_UP"], rules, live_min)
    for subject, nonce, why in [("c-late", old.nonce, "CHALLENGE_EXPIRED"), ("c-late", "no-such-nonce", "CHALLENGE_NOT_FOUND")]:
        with pytest.raises(grpc.RpcError) as err:
            submit(s, subject, nonce, frames)
        assert details_of(err.value)["reason"] == why
    r, _ = start(s, "c-owner")
    with pytest.raises(grpc.RpcError) as err:
        submit(s, "c-thief", r.challenge.nonce, frames)
    assert details_of(err.value)["reason"] == "CHALLENGE_MISMATCH"


def test_bad_frames_do_not_spend_the_nonce(face_service, pools, rules, live_min):
    r, moves = start(face_service, "c-badframe")
    frames = burst(pools[0], moves, rules, live_min)
    broken = list(frames)
    broken[3] = (frames[3][0][:100], frames[3][1])
    with pytest.raises(grpc.RpcError) as err:
        submit(face_service, "c-badframe", r.challenge.nonce, broken)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert submit(face_service, "c-badframe", r.challenge.nonce, frames).passed


def test_trajectory_labels():
    rules = ChallengeRules()
    assert label(0, 0, rules) == "NEUTRAL" and label(20, 2, rules) == "TURN_LEFT" and label(-20, 0, rules) == "TURN_RIGHT"
    assert label(2, 10, rules) == "LOOK_UP" and label(0, -10, rules) == "LOOK_DOWN" and label(10, 0, rules) == "BETWEEN"
    assert trajectory(["NEUTRAL", "NEUTRAL", "BETWEEN", "TURN_LEFT", "TURN_LEFT", "NEUTRAL"]) == ["NEUTRAL", "TURN_LEFT", "NEUTRAL"]
