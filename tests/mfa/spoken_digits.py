"""Spoken digit strings from real recordings: the Free Spoken Digit Dataset takes in
../shared/fixtures/voice/digits ({digit}_{speaker}_{take}.wav, 8 kHz, two speakers x 10 takes).

A speaker is enrolled from takes 0-2 of every digit; a challenge is answered with other takes
(3-9) of the asked digits, joined with short pauses, as a caller saying the digits does.
"""

from __future__ import annotations

import io
import random

import numpy as np
import soundfile as sf

from tests.conftest import SHARED

DIGITS_DIR = SHARED / "fixtures" / "voice" / "digits"
SPEAKERS = ("george", "jackson")
RATE = 8000
ENROL_TAKES = (0, 1, 2)
ANSWER_TAKES = range(3, 10)


def take(digit: int, speaker: str, n: int) -> np.ndarray:
    x, rate = sf.read(DIGITS_DIR / f"{digit}_{speaker}_{n}.wav", dtype="float32")
    assert rate == RATE
    return x


def wav(parts: list[np.ndarray], gap_s: float = 0.25, rate: int = RATE) -> bytes:
    """The takes joined with pauses, as WAV at ``rate`` (16000: what a phone app records; the
    recordings themselves are narrowband)."""
    pause = np.zeros(int(gap_s * RATE), np.float32)
    pieces = [pause]
    for p in parts:
        pieces += [p, pause]
    x = np.concatenate(pieces)
    if rate != RATE:
        import soxr

        x = soxr.resample(x, RATE, rate, quality="HQ").astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def enrolment(speaker: str, rate: int = RATE) -> list[bytes]:
    """Three utterances of 0-9, one per enrolment take (about 5 s of net speech each)."""
    return [wav([take(d, speaker, t) for d in range(10)], rate=rate) for t in ENROL_TAKES]


def answer(digits: str, speaker: str, rng: random.Random, rate: int = RATE) -> bytes:
    """The asked digits in takes the enrolment never used."""
    return wav([take(int(d), speaker, rng.choice(ANSWER_TAKES)) for d in digits.replace(" ", "")], rate=rate)


def over_the_line(wav_bytes: bytes) -> bytes:
    """What an IVR receives of a caller's answer: the telephone channel's G.711 mu-law bytes."""
    from services.voice import telephone

    x, rate = sf.read(io.BytesIO(wav_bytes), dtype="float32")
    return telephone.encode(x, rate)


def prepared(engine, audio: bytes, mulaw: bool = False):
    """The audio as the voice service's pipeline prepares it for a verification (raises its AudioError)."""
    from services.common.api.v1 import common_pb2
    from services.voice.service import audio_format

    fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000) if mulaw else (
        common_pb2.AudioFormat())
    return engine.pipeline.prepare(audio, audio_format(fmt, "audio.format"), "verify")


def heard_answer(engine, digits: str, speaker: str, rng: random.Random, tries: int = 40,
                 subject: tuple[str, str] | None = None, rate: int = RATE, telephone: bool = False) -> bytes | None:
    """An answer of the speaker's genuine takes that the voice service's digit recogniser hears as
    ``digits`` and its synthetic-speech detector takes for bona fide (it refuses 2.7 % of genuine
    telephone speech, bench/RESULTS.md); None when no such combination turns up. The flows through
    the MFA are what these tests are about, not the recogniser's accuracy: the takes are chosen
    among the speaker's own recordings of the digits, as a caller repeats what the line did not
    carry. ``engine``: the running voice service's VoiceEngine. With ``subject`` (tenant, subject
    id), an assembly the subject's replay cache would take for an answer it already accepted is
    skipped too: a caller's answer is a new recording, ours are assembled from 7 takes per digit.
    ``rate``: the WAV's sample rate (16000 as a phone app records); ``telephone``: the answer as
    the IVR receives it instead, G.711 mu-law bytes (:func:`over_the_line`).

    Never use it to measure a rate: it keeps only answers that pass (bench/genuine_rates.py)."""
    from services.voice import replay
    from services.voice.ingest import AudioError

    expected = digits.replace(" ", "")
    for _ in range(tries):
        audio = answer(expected, speaker, rng, rate=rate)
        if telephone:
            audio = over_the_line(audio)
        try:
            heard = prepared(engine, audio, mulaw=telephone)
        except AudioError:  # too little speech found in these takes (LOW_NET_SPEECH): other takes
            continue
        if subject is not None and not engine.replay_check(*subject, replay.fingerprint(heard.samples)).passed:
            continue
        if (engine.challenge_check(heard, expected).passed
                and engine.synthetic_check(heard, heard.channel, True).passed):
            return audio
    return None
