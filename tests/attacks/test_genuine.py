"""The customer still gets in: a few genuine flows through the same services and default policy
ALLOW (the rates are measured by bench/genuine_rates.py, bench/RESULTS.md)."""

from __future__ import annotations

import random

import pytest

from services.common.api.v1 import common_pb2, mfa_pb2, voice_pb2
from tests.attacks.conftest import FACE_IDENTITY, VOICE_SPEAKER, identity_photo
from tests.conftest import require
from tests.mfa import spoken_digits
from tests.mfa.conftest import App, phone_device

pytestmark = pytest.mark.attacks
F = mfa_pb2


def test_the_customer_s_selfie_signed_by_the_bound_phone_is_allowed(world, face_customer):
    ref, app = face_customer("genuine-face")  # itself a new phone's login: selfie and SMS code, then bound
    s = world.start(ref, app)
    assert s.device_bound
    r = world.submit(s, face=app.face(s, identity_photo(FACE_IDENTITY, 4))).result
    assert r.passed and r.binding == "device", r
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_ALLOW and set(d.amr) >= {"face", "swk"}, d


def answer(world, s, ref, stub=None, **kw):
    """The asked digits in the speaker's own takes that the service hears right (a caller repeats
    what the line did not carry); the test is about the flow, not the recogniser's rate."""
    challenge = world.voice_challenge(s, stub)
    audio = spoken_digits.heard_answer(world.voice_engine, challenge.digits, VOICE_SPEAKER,
                                       random.Random(challenge.digits),
                                       subject=(ref.tenant_id, ref.subject_id), **kw)
    assert audio is not None, f"no takes of {VOICE_SPEAKER} saying {challenge.digits} were heard"
    return audio, challenge.challenge.nonce


def test_the_customer_s_spoken_digits_are_allowed_in_the_app_and_on_the_ivr(world):
    require(world.bio.voice_ok, "the voice service (SERVING, with its Verify RPC)")
    # a wideband template for the app (16 kHz), a telephone one for the IVR (8 kHz)
    ref = world.enrol("genuine-voice", utterances=spoken_digits.enrolment(VOICE_SPEAKER, 16000), phone="+8613900000201")
    world.voice.Enroll(voice_pb2.EnrollVoiceRequest(subject=ref, utterances=[
        common_pb2.Audio(data=u) for u in spoken_digits.enrolment(VOICE_SPEAKER)]), timeout=120)
    app = App(phone_device(install="genuine-voice-phone"))
    s = world.start(ref, app)  # a new phone: the digits and the SMS code, then the phone binds its key
    audio, nonce = answer(world, s, ref, rate=16000)
    assert world.submit(s, voice=app.voice(s, audio, nonce)).result.passed
    assert world.otp(s).result.passed
    assert world.decide(s).outcome == F.OUTCOME_ALLOW
    world.bind(s, app)
    s = world.start(ref, app)  # the bound phone: its signature over the recording proves the device
    audio, nonce = answer(world, s, ref, rate=16000)
    r = world.submit(s, voice=app.voice(s, audio, nonce)).result
    assert r.passed and r.binding == "device", r
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_ALLOW and set(d.amr) >= {"vbm", "swk"}, d

    s = world.start_ivr(ref)  # a call: the IVR platform's capture, and the SMS code
    audio, nonce = answer(world, s, ref, stub=world.ivr, telephone=True)
    r = world.submit(s, stub=world.ivr, voice=world.ivr_voice(s, audio, nonce)).result
    assert r.passed and r.binding == "terminal", r
    assert world.otp(s, stub=world.ivr).result.passed
    d = world.decide(s, stub=world.ivr)
    assert d.outcome == F.OUTCOME_ALLOW, d
