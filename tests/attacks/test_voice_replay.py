"""Voice replay and synthetic speech, through the real voice and MFA services with the default
policy: the bank's IVR platform (a registered terminal: its capture counts as the channel's, so the
voice factor itself must refuse) and the app of a phone the attacker owns.

The replay is simulated with numpy/scipy (services/voice/attacks.py): the customer's recorded
answer to an earlier call played through a small loudspeaker (band-pass 250 Hz - 3.6 kHz, soft
saturation) 0.3 m from the phone in rooms from a car to a meeting room (synthetic impulse responses:
Sabine's RT60 0.09-1.07 s, direct-to-reverberant ratio from the critical distance), noise at 20 dB
SNR, then the telephone channel (300-3400 Hz, G.711 mu-law)."""

from __future__ import annotations

import io
import random

import grpc
import numpy as np
import pytest
import soundfile as sf

from services.common.api.v1 import common_pb2, mfa_pb2, voice_pb2
from services.voice import attacks, telephone
from services.voice.ingest import AudioError
from tests.attacks.conftest import VOICE_SPEAKER, codes, refused
from tests.mfa import spoken_digits
from tests.mfa.conftest import App, phone_device

pytestmark = pytest.mark.attacks
F = mfa_pb2
RATE = spoken_digits.RATE


def samples(wav: bytes) -> np.ndarray:
    x, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == RATE
    return x


def one_edit_apart(a: str, b: str) -> bool:
    """What the digit check accepts (challenge_max_digit_errors = 1: one digit wrong)."""
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) <= 1


def audible(world, digits: str, rng: random.Random, room=None, tries: int = 20) -> bytes:
    """The customer saying ``digits`` (the speaker's own takes, never enrolled) as the IVR receives
    it, G.711 mu-law, played in ``room`` first if given, in takes the service still hears enough
    speech in. Six isolated digits are about 2 s of speech, and the service's voice activity
    detector finds less than the 1 s it needs to verify in some strings, more often after a
    loudspeaker and a room (LOW_NET_SPEECH, NO_SPEECH: bench/RESULTS.md "Attack suite and genuine
    rates"); such a recording is refused before any check, which stops that replay but no attacker.
    The checks these tests are about come after it."""
    for i in range(tries):
        x = samples(spoken_digits.answer(digits, VOICE_SPEAKER, rng))
        if room is not None:
            x = attacks.replay_in_room(x, RATE, room, distance_m=0.3, snr_db=20.0, seed=i)
        mulaw = telephone.encode(x, RATE)
        try:
            spoken_digits.prepared(world.voice_engine, mulaw, mulaw=True)
        except AudioError:
            continue
        return mulaw
    raise AssertionError(f"no recording of {digits}{' in the ' + room.name if room else ''} kept enough speech")


@pytest.fixture(scope="module")
def overheard(world, voice_customer):
    """A call of the customer that the attacker recorded: the IVR asked for digits and the customer
    said them. (digits, that call's nonce, the recorded answer's mu-law bytes); the customer's
    answer spent the nonce."""
    ref, rng = voice_customer
    s = world.start_ivr(ref)
    challenge = world.voice_challenge(s, world.ivr)
    digits = challenge.digits.replace(" ", "")
    answer = audible(world, digits, rng)
    world.submit(s, stub=world.ivr, voice=world.ivr_voice(s, answer, challenge.challenge.nonce))
    return digits, challenge.challenge.nonce, answer


def test_the_voice_service_refuses_a_recording_without_a_fresh_challenge(world, voice_customer, overheard):
    """Straight to the voice service (a caller with the bank's credentials): no nonce, or the nonce
    of the call it was recorded on, and the recording is not even scored."""
    ref, _ = voice_customer
    _, stale, answer = overheard
    audio = common_pb2.Audio(data=answer, format=common_pb2.AudioFormat(
        encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000))
    for nonce, reason in (("", "CHALLENGE_REQUIRED"), (stale, "CHALLENGE_USED")):
        assert refused(lambda nonce=nonce: world.voice.Verify(voice_pb2.VerifyVoiceRequest(
            subject=ref, audio=audio, channel=voice_pb2.VOICE_CHANNEL_TELEPHONE, challenge_nonce=nonce),
            timeout=60)) == (grpc.StatusCode.FAILED_PRECONDITION, reason)


@pytest.mark.parametrize("room", attacks.ROOMS, ids=lambda r: r.name.replace(" ", "-"))
def test_a_replayed_recording_through_a_loudspeaker_a_room_and_g711_is_refused(world, voice_customer, overheard, room):
    """The customer's recorded answer, played to the IVR through a loudspeaker in a room: without a
    challenge, or with the nonce of the call it was recorded on, the MFA does not take it; with this
    call's challenge it says the old digits (CHALLENGE_FAILED, a veto), and the call is denied even
    with the customer's SMS code (a swapped SIM)."""
    ref, _ = voice_customer
    digits, stale, _ = overheard
    replay = audible(world, digits, random.Random(attacks.ROOMS.index(room)), room)
    s = world.start_ivr(ref)
    assert refused(lambda: world.submit(s, stub=world.ivr, voice=world.ivr_voice(s, replay))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_REQUIRED")
    assert refused(lambda: world.submit(s, stub=world.ivr, voice=world.ivr_voice(s, replay, stale))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_NOT_IN_SESSION")
    challenge = world.voice_challenge(s, world.ivr)
    while one_edit_apart(challenge.digits.replace(" ", ""), digits):  # p = 55e-6: the old digits would answer
        challenge = world.voice_challenge(s, world.ivr)
    r = world.submit_patiently(s, stub=world.ivr, voice=world.ivr_voice(s, replay, challenge.challenge.nonce)).result
    assert not r.passed and r.veto and codes(r)[0] == "CHALLENGE_FAILED", r
    world.otp(s, stub=world.ivr)
    d = world.decide(s, stub=world.ivr)
    assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "VETO" and "CHALLENGE_FAILED" in [
        x.code for x in d.reasons], d


@pytest.fixture(scope="module")
def espeak_targets(world):
    """A fresh enrolment of the customer's voice per channel (the replays above count failures
    against the first one): 16 kHz for the app (wideband templates), 8 kHz for the IVR."""
    refs = {}
    for i, (channel, rate) in enumerate((("app", 16000), ("ivr", spoken_digits.RATE), ("app-narrowband", 16000))):
        refs[channel] = world.enrol(f"voice-tts-{channel}", utterances=spoken_digits.enrolment(VOICE_SPEAKER, rate),
                                    phone=f"+861390000010{i}")
    return refs


@pytest.mark.parametrize("channel", ["app", "ivr", "app-narrowband"])
def test_espeak_speech_saying_the_asked_digits_is_refused(world, espeak_targets, channel):
    """espeak-ng says exactly the digits asked (the challenge is answered): the synthetic-speech
    detector and the speaker check are what stand; the session is denied even with the SMS code.
    app-narrowband: the speech band-limited to 4 kHz in the 16 kHz clip, decided on the wideband record
    (the telephone record let 19 of 80 band-limited espeak-ng clips through, a narrowband-16k record of
    its own 16 of 80 held out, against 2 of 80 on the wideband one: bench/RESULTS.md)."""
    ref = espeak_targets[channel]
    if channel.startswith("app"):
        attacker = App(phone_device(install=f"tts-{channel}", model="Redmi Note 12"))
        s = world.start(ref, attacker)
        challenge = world.voice_challenge(s)
        speech = attacks.espeak(" ".join(challenge.digits.replace(" ", "")), voice="en-us", rate=16000)
        if channel == "app-narrowband":
            from services.voice.telephone import narrowband

            speech = narrowband(speech)
        buf = io.BytesIO()
        sf.write(buf, speech, 16000, format="WAV", subtype="PCM_16")
        r = world.submit(s, voice=attacker.voice(s, buf.getvalue(), challenge.challenge.nonce)).result
        stub = world.mfa_stub
    else:
        s = world.start_ivr(ref)
        challenge = world.voice_challenge(s, world.ivr)
        speech = attacks.espeak(" ".join(challenge.digits.replace(" ", "")), voice="en-us", rate=16000)
        r = world.submit(s, stub=world.ivr, voice=world.ivr_voice(s, telephone.encode(speech, 16000),
                                                                  challenge.challenge.nonce)).result
        stub = world.ivr
    # Every layer ran and answers: AASIST flags espeak-ng (not every time: on unseen espeak-ng voices
    # its records let 24-30 % through), and the speaker check does not take espeak's voice for the customer's.
    assert not r.passed
    assert {"SPOOF_DETECTED", "NO_MATCH"} & set(codes(r)), r
    # The APCER the decision states is its record's claim: the re-check on espeak-ng voices no fit or
    # check used, which the record itself marks inconsistent with the 5e-2 target.
    from services.common.models import ModelStore

    settings = world.bio.settings
    record = ModelStore(settings).calibration("aasist", "telephony-8k" if channel == "ivr" else "wideband")
    assert record is not None
    claim = record.claim(settings.voice.antispoof_target_apcer)
    assert r.HasField("measured_apcer") and r.measured_apcer == pytest.approx(claim.rate), r
    assert claim.source == "held_out" and claim.consistent is False
    world.otp(s, stub=stub)
    d = world.decide(s, stub=stub)
    assert d.outcome == F.OUTCOME_DENY, d

