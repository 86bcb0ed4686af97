"""Face injection: a photo or a burst that did not come from the customer's own camera, sent through
the real face and MFA services with the default policy. The defence is the capture's binding (a
signature by the customer's bound device key over the session, what the user was shown and the
SHA-256 of every image): passive liveness cannot tell an injected digital photo from a selfie."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grpc
import pytest

from services.common.api.v1 import common_pb2, mfa_pb2
from services.mfa.binding import payee_object
from tests.attacks.conftest import FACE_IDENTITY, codes, identity_photo, refused
from tests.mfa.conftest import App, phone_device
from tests.mfa.world import FIX, PAYEE

pytestmark = pytest.mark.attacks
F = mfa_pb2


def still_needed(d) -> list[list[int]]:
    return [list(x.factors) for x in d.still_needed]


def test_a_downloaded_photo_from_an_unbound_device_is_not_enough(world, face_customer):
    """The issue's photo injection: another photo of the customer (as found online) for a CNY 4,900
    payment from a phone never seen. Unsigned, the MFA refuses it before the face service; signed by
    the attacker's own new key the face may match, but that key proves no possession: the payment
    still needs the customer's SMS code."""
    ref, _ = face_customer("inj-unbound")
    downloaded = identity_photo(FACE_IDENTITY, 3)
    attacker = App(phone_device(install="attacker-phone", model="Redmi Note 12"))
    s = world.start(ref, attacker, action="payment", amount=4_900_00)
    assert not s.device_bound
    assert refused(lambda: world.submit(s, face=F.FaceEvidence(image=common_pb2.Image(data=downloaded)))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CAPTURE_NOT_BOUND")
    r = world.submit(s, face=attacker.face(s, downloaded)).result
    assert r.binding == "new_device", r
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_STEP_UP and still_needed(d) == [[F.FACTOR_TYPE_SMS_OTP]], d


def test_a_downloaded_photo_on_the_bound_device_without_its_signature_is_refused(world, face_customer):
    """The attacker claims the customer's bound phone (its install id and model, its device id) but
    has not got its key: a device id without a signature is not a binding; a signature by another
    key is a veto; a fresh key in place of the bound one is refused."""
    ref, app = face_customer("inj-bound")
    downloaded = identity_photo(FACE_IDENTITY, 3)
    clone = App(app.device)  # the same device attributes, another key
    s = world.start(ref, clone)
    assert s.device_bound  # the session believes the claimed device until a key proves it
    assert refused(lambda: world.submit(s, face=F.FaceEvidence(
        image=common_pb2.Image(data=downloaded), binding=F.CaptureBinding(device_id=app.device_id)))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CAPTURE_NOT_BOUND")
    assert refused(lambda: world.submit(s, face=clone.face(s, downloaded))) == (  # its own key, as a new device
        grpc.StatusCode.FAILED_PRECONDITION, "NEW_DEVICE_KEY_NOT_ALLOWED")
    clone.device_id = app.device_id
    r = world.submit(s, face=clone.face(s, downloaded)).result
    assert (r.passed, r.veto, codes(r)) == (False, True, ["CAPTURE_SIGNATURE_INVALID"]), r
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "VETO", d


def test_a_capture_signed_for_another_session_amount_or_payee_is_refused(world, face_customer):
    """The customer's phone signs a real selfie with what it showed the user. Relayed into another
    session, or signed while the phone was made to show another amount or payee than the session
    decides (what you see is what you sign), the signature does not cover what is decided."""
    ref, app = face_customer("inj-context")
    selfie = identity_photo(FACE_IDENTITY, 2)
    mallory = F.Payee(name="Wang Fang", account_masked="6222 **** **** 9999")

    def showing(s, **change):  # the phone signs what it showed, which the attacker changed
        app.shown[s.session_id] = {**app.shown[s.session_id], **change}
        return s

    other = world.start(ref, app, action="payment", amount=49_00)
    cases = (  # the session decided, the capture the phone signed, the reason it is refused
        (world.start(ref, app, action="payment", amount=49_00), lambda s: app.face(other, selfie),
         "CAPTURE_FOR_OTHER_SESSION"),
        (showing(world.start(ref, app, action="payment", amount=4_900_00), amount=("CNY", 49_00)),
         lambda s: app.face(s, selfie), "CAPTURE_CONTEXT_MISMATCH"),
        (showing(world.start(ref, app, action="payment", amount=49_00, payee=mallory),
                 payee=payee_object(PAYEE.name, PAYEE.account_masked)),
         lambda s: app.face(s, selfie), "CAPTURE_CONTEXT_MISMATCH"),
    )
    for s, capture, reason in cases:
        r = world.submit_patiently(s, face=capture(s)).result
        assert (r.passed, r.veto, codes(r)) == (False, True, [reason]), (reason, r)
        assert not r.HasField("target_fmr")  # refused before the face service was asked
        d = world.decide(s)
        assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "VETO", d


@pytest.fixture(scope="module")
def burst_pool(world):
    """Frames of a webcam video of one person (pad_face.csv, bona fide), their head poses measured
    by the running face service's own pipeline: what an attacker who recorded the customer holds."""
    face_tests = str(Path(__file__).parents[1] / "face")  # challenge_frames imports its helpers by name
    if face_tests not in sys.path:
        sys.path.insert(0, face_tests)
    import challenge_frames

    face = world.bio.running["face"].definition.service
    pool = challenge_frames.measure_pool(face.pipeline, sorted((FIX / "face/pad/live").glob("apfol_real_*")))
    return challenge_frames, face._rules(), pool


def test_a_head_move_burst_assembled_from_stored_frames_is_refused(world, face_customer, burst_pool):
    """The issue's replayed burst: stored frames that answer the asked moves, assembled offline.
    Unbound, or with a signature over other frames, it never reaches the face service; signed by
    the customer's bound phone (what a compromised phone can do: README threat model) the same
    burst passes, so the frames themselves would have fooled the liveness challenge."""
    from services.face.service import MOVE_ENUMS

    challenge_frames, rules, pool = burst_pool
    ref, app = face_customer("inj-burst", enrol=pool[0].path.read_bytes(), selfie=pool[0].path.read_bytes())
    names = {v: k for k, v in MOVE_ENUMS.items()}

    def burst_for(s):
        challenge = world.mfa_stub.StartBiometricChallenge(F.StartBiometricChallengeRequest(
            session_id=s.session_id, modality=common_pb2.MODALITY_FACE))
        frames = challenge_frames.burst(pool, [names[m] for m in challenge.moves], rules, rules.live_threshold + 0.1)
        time.sleep((frames[-1][1] - frames[0][1]) / 1000)  # a camera needs the burst's duration
        return challenge.challenge.nonce, [common_pb2.Frame(image=common_pb2.Image(data=d), capture_time_ms=t)
                                           for d, t in frames]

    s = world.start(ref, app)
    nonce, frames = burst_for(s)
    assert refused(lambda: world.submit(s, face=F.FaceEvidence(frames=frames, challenge_nonce=nonce))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CAPTURE_NOT_BOUND")
    signed = app.burst(s, frames, nonce)  # a signature over another order of the frames: bound to nothing sent
    swapped = F.FaceEvidence(frames=[frames[1], frames[0], *frames[2:]], challenge_nonce=nonce, binding=signed.binding)
    r = world.submit(s, face=swapped).result
    assert (r.passed, r.veto, codes(r)) == (False, True, ["CAPTURE_EVIDENCE_MISMATCH"]), r
    assert world.decide(s).outcome == F.OUTCOME_DENY

    s = world.start(ref, app)
    nonce, frames = burst_for(s)
    r = world.submit(s, face=app.burst(s, frames, nonce)).result
    assert r.passed and r.binding == "device", r
    assert world.decide(s).outcome == F.OUTCOME_ALLOW
