"""End to end: real face, voice and MFA services on loopback with the shared fixtures.

Written against the proto. The customer's app (tests/mfa/conftest.py App) signs every capture with
the session's transaction context: its bound key, or before binding the key it then binds. A test
needing the face or the voice service's Verify skips while that RPC answers UNIMPLEMENTED (and
fails in CI, like any missing requirement).
"""

from __future__ import annotations

import random
import re
import time

import grpc
import numpy as np
import pytest

from services.common.api.v1 import common_pb2, face_pb2, mfa_pb2, mfa_pb2_grpc
from services.common.errors import details_of
from services.mfa.tokens import verify_token
from tests.conftest import SHARED, ServiceHarness, make_settings, present, require
from tests.mfa import spoken_digits
from tests.mfa.conftest import App, outbox_codes, phone_device
from tests.mfa.world import World, rows, running_services

F = mfa_pb2
FIX = SHARED / "fixtures"
TENANT = "bank-e2e"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("e2e")) as services:
        yield services


@pytest.fixture(scope="module")
def world(e2e):
    bio, mfa = e2e
    w = World(bio, mfa, tenant=TENANT)
    yield w
    w.close()


@pytest.fixture
def face_world(world):
    require(world.bio.face_ok, "the face service (SERVING, with its Verify RPC)")
    return world


def genuine_face_trial():
    row = next(r for r in rows("trials_face.csv") if r["target"] == "1")
    return row["enroll"], row["probe"], row["enroll_identity"]


def impostor_probe(identity):
    return next(r["probe"] for r in rows("trials_face.csv") if r["target"] == "0" and r["enroll_identity"] == identity)


@pytest.fixture(scope="module")
def face_subject(world):
    require(world.bio.face_ok, "the face service (SERVING, with its Verify RPC)")
    enroll, probe, identity = genuine_face_trial()
    ref = world.enrol("face-cust-1", face_path=enroll)
    app = App()
    s = world.start(ref, app)
    assert not s.device_bound
    r = world.face_factor(s, probe, app)  # signed by the key the app will bind: no possession proven
    assert r.result.passed and r.result.binding == "new_device", r
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_STEP_UP and [list(x.factors) for x in d.still_needed] == [[F.FACTOR_TYPE_SMS_OTP]]
    assert world.otp(s).result.passed
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_ALLOW and d.acr == "aal2", d
    app.device_id = world.mfa_stub.RegisterDevice(F.RegisterDeviceRequest(
        session_id=s.session_id, device=app.device, public_key=app.public_der, label="phone")).device_id
    return ref, app, probe, identity


def test_new_device_steps_up_then_allows_after_the_correct_otp(face_subject):
    assert face_subject[1].device_id  # the fixture ran the flow and bound the device


def test_genuine_face_on_a_bound_device_is_allowed_and_the_token_verifies(world, face_subject):
    """One capture signed by the bound key: the face and the device it proves; the token states
    per factor how it was bound and the operating points that decided."""
    ref, app, probe, _ = face_subject
    s = world.start(ref, app)
    assert s.device_bound
    r = world.face_factor(s, probe, app).result
    assert r.passed and r.binding == "device", r
    assert r.target_fmr == pytest.approx(world.bio.settings.face.target_fmr) and r.HasField("measured_fmr")
    assert r.target_apcer == pytest.approx(world.bio.settings.face.liveness_target_apcer) and r.HasField("measured_apcer")
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_ALLOW and set(d.amr) >= {"face", "swk"}
    jwks = world.mfa_stub.GetSigningKeys(F.GetSigningKeysRequest()).jwks_json
    claims = verify_token(d.token, jwks, world.mfa.settings.mfa.issuer, TENANT)
    assert claims["decision"] == "allow" and claims["acr"] == "aal2"
    face = next(f for f in claims["fac"] if f["f"] == "face")
    assert face["bind"] == "device" and face["fmr"] == r.target_fmr and face["fmr_measured"] == r.measured_fmr
    assert face["apcer"] == r.target_apcer and face["apcer_measured"] == r.measured_apcer


def test_a_session_hands_out_a_bounded_number_of_face_challenges(world, face_subject):
    """Each StartBiometricChallenge asks the face service and grows the session: an attacker holding a
    session could ask without end. The default policy allows 5 per modality; the sixth is refused
    before the face service is asked, and the session keeps the five nonces it handed out."""
    ref, app, _, _ = face_subject
    s = world.start(ref, app)
    ask = F.StartBiometricChallengeRequest(session_id=s.session_id, modality=common_pb2.MODALITY_FACE)
    nonces = {world.mfa_stub.StartBiometricChallenge(ask).challenge.nonce for _ in range(5)}
    assert len(nonces) == 5
    with pytest.raises(grpc.RpcError) as err:
        world.mfa_stub.StartBiometricChallenge(ask)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "SESSION_LIMIT_REACHED" and "5 face challenges" in (err.value.details() or "")


def test_an_impostor_face_is_denied(world, face_subject):
    ref, app, _, identity = face_subject
    s = world.start(ref, app)
    r = world.face_factor(s, impostor_probe(identity), app)
    assert not r.result.passed and r.result.llr < 0
    assert world.decide(s).outcome == F.OUTCOME_DENY


def test_a_spoof_frame_is_denied_by_the_veto(world, face_subject):
    ref, app, _, _ = face_subject
    spoofs = [r["path"] for r in rows("pad_face.csv") if r["label"] == "spoof"]
    flagged = None
    for path in spoofs[:20]:  # the first spoof the face service's liveness flags
        live = world.face.CheckLiveness(face_pb2.CheckLivenessRequest(
            tenant_id=TENANT, image=common_pb2.Image(data=(FIX / path).read_bytes())), timeout=60)
        if not live.live:
            flagged = path
            break
    assert flagged, "no spoof among the first 20 was flagged by the face service"
    s = world.start(ref, app)
    r = world.face_factor(s, flagged, app)
    assert r.result.veto and not r.result.passed
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "VETO"
    # the factor and the face service both say LIVENESS_FAILED: one reason to the relying party
    for reasons in (r.result.reasons, d.reasons):
        codes = [x.code for x in reasons]
        assert codes.count("LIVENESS_FAILED") == 1 and len(set(codes)) == len(codes), codes


def test_an_unusable_capture_names_the_face_services_issue_once(world, face_subject):
    """The face service reports a refused image's issue in its quality and in its reasons; the
    factor puts CAPTURE_REJECTED before them."""
    import cv2

    ref, app, _, _ = face_subject
    ok, blank = cv2.imencode(".png", np.full((240, 240, 3), 120, np.uint8))
    assert ok
    s = world.start(ref, app)
    r = world.submit(s, face=app.face(s, blank.tobytes()))
    assert not r.result.passed and not r.result.veto
    assert [x.code for x in r.result.reasons] == ["CAPTURE_REJECTED", "NO_FACE"], r.result.reasons


def test_a_payment_above_the_amount_band_requires_a_second_independent_factor(world, face_subject):
    """The face and the device key it was signed with are one phone: above the band the SMS
    channel is asked for as well."""
    ref, app, probe, _ = face_subject
    s = world.start(ref, app, action="payment", amount=20_000_00)
    assert all(len(x.factors) >= 2 for x in s.acceptable)
    assert world.face_factor(s, probe, app).result.passed
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_STEP_UP and [list(x.factors) for x in d.still_needed] == [[F.FACTOR_TYPE_SMS_OTP]]
    world.otp(s)
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_ALLOW and "mfa" in d.amr


def test_a_fraud_script_phrase_forces_review(world, face_subject):
    ref, app, probe, _ = face_subject
    s = world.start(ref, app, action="payment", amount=100_00, text="客服说要把钱转到安全账户，并且让他代操作")
    assert "FRAUD_SCRIPT_PHRASE" in [r.code for r in s.risk.reasons]
    world.face_factor(s, probe, app)
    d = world.decide(s)
    if d.outcome == F.OUTCOME_STEP_UP:
        world.otp(s)
        d = world.decide(s)
    assert d.outcome == F.OUTCOME_REVIEW and d.review_id
    assert d.review_id in [r.review_id for r in world.mfa_stub.ListReviews(F.ListReviewsRequest(tenant_id=TENANT)).reviews]


def test_five_wrong_otps_lock_the_subject(face_world):
    world = face_world
    """Default policy: from the third failure on, the next attempt waits (5 s, then 10 s); the
    fifth failure locks."""
    enroll, _, _ = genuine_face_trial()
    ref = world.enrol("face-cust-lock", face_path=enroll)
    s = world.start(ref, App())
    world.mfa_stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
    wrong = f"{(int(outbox_codes(world.mfa.settings)[-1]) + 1) % 10 ** 6:06d}"
    failures = throttled = 0
    while failures < 5:
        try:
            r = world.mfa_stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id,
                                                                  otp=F.OtpEvidence(code=wrong)))
        except grpc.RpcError as err:
            assert details_of(err)["reason"] == "THROTTLED", err
            throttled += 1
            time.sleep(int(present(re.search(r"in (\d+) s", err.details() or "")).group(1)))
            continue
        assert not r.result.passed
        failures += 1
    assert throttled >= 2 and r.attempts_left == 0
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "SUBJECT_LOCKED"
    with pytest.raises(grpc.RpcError) as locked:
        world.start(ref, App())
    assert details_of(locked.value)["reason"] == "SUBJECT_LOCKED"
    world.mfa_stub.UnlockSubject(F.UnlockSubjectRequest(subject=ref, reason="identity-verified"))
    assert world.start(ref, App()).session_id


@pytest.fixture(scope="module")
def digits_voice(world):
    """A caller enrolled from real recordings of spoken digits (8 kHz: the telephone family)."""
    require(world.bio.voice_ok, "the voice service (SERVING, with its Verify RPC)")
    ref = world.enrol("voice-cust-digits", utterances=spoken_digits.enrolment("george"), phone="+8613600135678")
    return ref, random.Random(7)


def answer_challenge(world, s, app, rng, speaker="george", ref=None):
    """Asks the MFA for the digit challenge and answers it with the speaker's recorded digits: takes
    of the asked digits that the service hears right (a caller repeats what the line did not carry;
    about 98 % of first answers pass, bench/RESULTS.md "Digit challenge (real speech)")."""
    challenge = world.voice_challenge(s)
    audio = spoken_digits.heard_answer(world.voice_engine, challenge.digits, speaker, rng,
                                       subject=(ref.tenant_id, ref.subject_id) if ref else None)
    assert audio is not None, f"no takes of {speaker} saying {challenge.digits} were heard"
    return world.submit(s, voice=app.voice(s, audio, challenge.challenge.nonce))


def test_genuine_voice_answers_the_digit_challenge_through_the_mfa(world, digits_voice):
    """The voice factor needs the challenge this session handed out (default policy); the
    customer's digits, signed by the app, pass; on the bound phone they prove the device too."""
    ref, rng = digits_voice
    app = App(phone_device(install="george-phone"))
    s = world.start(ref, app)
    with pytest.raises(grpc.RpcError) as err:  # a recording without the asked digits is not even taken
        world.submit(s, voice=app.voice(s, spoken_digits.answer("0123456789", "george", rng)))
    assert details_of(err.value)["reason"] == "CHALLENGE_REQUIRED"
    r = answer_challenge(world, s, app, rng, ref=ref).result
    assert r.passed and r.binding == "new_device" and r.llr > 0, r
    assert r.target_fmr == pytest.approx(world.bio.settings.voice.target_fmr_by_channel["telephone"])
    assert r.HasField("measured_fmr") and r.HasField("target_apcer")  # AASIST ran: its operating point
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_STEP_UP  # a new phone: the SMS channel too
    world.otp(s)
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_ALLOW and d.acr == "aal2", d
    app.device_id = world.mfa_stub.RegisterDevice(F.RegisterDeviceRequest(
        session_id=s.session_id, device=app.device, public_key=app.public_der, label="phone")).device_id
    s = world.start(ref, app)
    r = answer_challenge(world, s, app, rng, ref=ref).result
    assert r.passed and r.binding == "device", r
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_ALLOW and set(d.amr) >= {"vbm", "swk"}, d


def test_another_speakers_digits_are_denied(world, digits_voice):
    ref, rng = digits_voice
    app = App(phone_device(install="jackson-phone"))
    s = world.start(ref, app)
    r = answer_challenge(world, s, app, rng, speaker="jackson").result
    assert not r.passed and r.llr < 0
    world.otp(s)
    assert world.decide(s).outcome == F.OUTCOME_DENY


def test_voice_service_down_means_degraded_mode_and_it_recovers(world, digits_voice):
    ref, rng = digits_voice
    app = App(phone_device(install="george-phone-3"))
    s = world.start(ref, app)
    voice = world.bio.running["voice"]
    port = voice.port
    voice.stop(grace=0)
    with pytest.raises(grpc.RpcError) as err:
        world.voice_challenge(s)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details_of(err.value)["reason"] == "VOICE_SERVICE_UNAVAILABLE"
    world.otp(s)
    d = world.decide(s)
    assert d.outcome != F.OUTCOME_ALLOW  # never allow on an error
    # the voice service comes back on its port
    from services.common.server.bootstrap import RunningServer
    from services.serve import definition

    back = RunningServer(world.bio.settings, definition(world.bio.settings, "voice"), port=port).start()
    world.bio.running["voice"] = back
    assert back.ready.wait(300)
    deadline = time.monotonic() + 60
    while True:
        s = world.start(ref, app)
        try:
            r = answer_challenge(world, s, app, rng, ref=ref)
            break
        except grpc.RpcError as err:
            # While the breaker is open new sessions plan without voice (FAILED_PRECONDITION), and
            # the client channel reconnects with back-off (UNAVAILABLE) until the breaker half-opens.
            assert err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE), err
            assert time.monotonic() < deadline, "voice never became acceptable again"
            time.sleep(2)
    assert r.result.passed, r
    world.otp(s)
    assert world.decide(s).outcome == F.OUTCOME_ALLOW


def test_challenges_of_face_voice_and_sms_start_through_the_mfa_and_bind_to_the_session(world):
    require(world.bio.face_ok and world.bio.voice_ok, "the face and voice services (SERVING)")
    row = next(r for r in rows("trials_voice.csv") if r["target"] == "1")
    enroll, _, _ = genuine_face_trial()
    ref = world.enrol("challenge-cust-1", face_path=enroll, voice_path=row["enroll"], phone="+8613900135678")
    app = App()
    s = world.start(ref, app)
    face = world.mfa_stub.StartBiometricChallenge(F.StartBiometricChallengeRequest(
        session_id=s.session_id, modality=common_pb2.MODALITY_FACE))
    voice = world.mfa_stub.StartBiometricChallenge(F.StartBiometricChallengeRequest(
        session_id=s.session_id, modality=common_pb2.MODALITY_VOICE))
    sms = world.mfa_stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
    assert face.challenge.nonce and len(face.moves) >= 1 and not face.digits
    assert voice.challenge.nonce and voice.digits.replace(" ", "").isdigit() and not voice.moves
    assert sms.masked_phone.endswith("5678") and sms.expires_at.seconds > 0
    # The session keeps what it handed out: another session's nonce is refused before any service call.
    other = world.start(ref, App())
    with pytest.raises(grpc.RpcError) as err:
        world.mfa_stub.SubmitFactor(F.SubmitFactorRequest(session_id=other.session_id, voice=F.VoiceEvidence(
            audio=common_pb2.Audio(data=(FIX / row["probe"]).read_bytes()), challenge_nonce=voice.challenge.nonce)))
    assert details_of(err.value)["reason"] == "CHALLENGE_NOT_IN_SESSION"
    with pytest.raises(grpc.RpcError) as err:
        world.mfa_stub.SubmitFactor(F.SubmitFactorRequest(session_id=other.session_id, face=F.FaceEvidence(
            frames=[common_pb2.Frame(image=common_pb2.Image(data=b"x"))], challenge_nonce=face.challenge.nonce)))
    assert details_of(err.value)["reason"] == "CHALLENGE_NOT_IN_SESSION"
    # In its own session the voice nonce reaches the voice service, which decides the digits.
    r = world.submit(s, voice=app.voice(s, (FIX / row["probe"]).read_bytes(), voice.challenge.nonce))
    assert r.result.veto and "CHALLENGE_FAILED" in [x.code for x in r.result.reasons]  # other words spoken


def test_delete_subject_erases_templates_through_the_face_and_voice_services(world):
    require(world.bio.face_ok and world.bio.voice_ok, "the face and voice services (SERVING)")
    row = next(r for r in rows("trials_voice.csv") if r["target"] == "1")
    enroll, probe, _ = genuine_face_trial()
    ref = world.enrol("erase-cust-1", face_path=enroll, voice_path=row["enroll"], phone="+8613700135678")
    app = App()
    s = world.start(ref, app)
    assert world.face_factor(s, probe, app).result.passed and world.otp(s).result.passed
    assert world.decide(s).outcome == F.OUTCOME_ALLOW
    world.mfa_stub.RegisterDevice(F.RegisterDeviceRequest(session_id=s.session_id, device=app.device,
                                                          public_key=app.public_der, label="phone"))

    def enrolled(stub):
        return len(stub.GetEnrollment(common_pb2.GetEnrollmentRequest(subject=ref)).templates)

    # An MFA whose voice service cannot be reached: UNAVAILABLE naming it, and the MFA's own data
    # (devices, consent, phone) stays for the retry. The face service erased its templates already.
    cut = ServiceHarness(make_settings(world.mfa.settings.data_dir, clients={
        "face": {"target": world.bio.running["face"].address},
        "voice": {"target": "127.0.0.1:9", "retries": 0, "deadline_s": 2}}))
    cut.start("mfa")
    try:
        with cut.channel("mfa", "dev-admin") as ch:
            with pytest.raises(grpc.RpcError) as err:
                mfa_pb2_grpc.MfaServiceStub(ch).DeleteSubject(common_pb2.DeleteSubjectRequest(subject=ref, reason="gdpr-art17"))
    finally:
        cut.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details_of(err.value)["reason"] == "VOICE_SERVICE_UNAVAILABLE" and "voice service" in (err.value.details() or "")
    assert (enrolled(world.face), enrolled(world.voice)) == (0, 1)
    assert len(world.mfa_stub.ListDevices(F.ListDevicesRequest(subject=ref)).devices) == 1
    assert len(world.mfa_stub.GetConsent(common_pb2.GetConsentRequest(subject=ref)).consents) == 1

    # The retry through the MFA that reaches both completes the erasure; a further one finds nothing.
    erased = world.mfa_stub.DeleteSubject(common_pb2.DeleteSubjectRequest(subject=ref, reason="gdpr-art17"))
    assert (erased.templates_deleted, erased.devices_deleted, erased.contact_erased) == (1, 1, True)
    assert (enrolled(world.face), enrolled(world.voice)) == (0, 0)
    assert world.mfa_stub.ListDevices(F.ListDevicesRequest(subject=ref)).devices == []
    assert world.mfa_stub.GetConsent(common_pb2.GetConsentRequest(subject=ref)).consents == []
    again = world.mfa_stub.DeleteSubject(common_pb2.DeleteSubjectRequest(subject=ref, reason="gdpr-art17"))
    assert (again.templates_deleted, again.devices_deleted, again.contact_erased) == (0, 0, False)
    with pytest.raises(grpc.RpcError) as err:  # the face service no longer verifies the subject
        world.face.Verify(face_pb2.VerifyFaceRequest(subject=ref, image=common_pb2.Image(
            data=(FIX / probe).read_bytes())), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no face template" in (err.value.details() or "")


# ---------------------------------------------------------------- capture bindings (the attacks: tests/attacks/)
def test_captures_of_one_session_are_signed_by_one_key(world, face_subject):
    ref, _, probe, _ = face_subject
    first, second = App(phone_device(install="phone-a")), App(phone_device(install="phone-a"))
    s = world.start(ref, first)
    second.shown = first.shown
    assert world.face_factor(s, probe, first).result.binding == "new_device"
    r = world.face_factor(s, probe, second).result
    assert r.veto and [x.code for x in r.reasons] == ["CAPTURE_KEY_CHANGED"]
