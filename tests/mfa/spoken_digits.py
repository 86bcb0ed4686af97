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


def wav(parts: list[np.ndarray], gap_s: float = 0.25) -> bytes:
    pause = np.zeros(int(gap_s * RATE), np.float32)
    pieces = [pause]
    for p in parts:
        pieces += [p, pause]
    buf = io.BytesIO()
    sf.write(buf, np.concatenate(pieces), RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def enrolment(speaker: str) -> list[bytes]:
    """Three utterances of 0-9, one per enrolment take (about 5 s of net speech each)."""
    return [wav([take(d, speaker, t) for d in range(10)]) for t in ENROL_TAKES]


def answer(digits: str, speaker: str, rng: random.Random) -> bytes:
    """The asked digits in takes the enrolment never used."""
    return wav([take(int(d), speaker, rng.choice(ANSWER_TAKES)) for d in digits.replace(" ", "")])


def _prepared(engine, audio: bytes):
    from services.common.api.v1 import common_pb2
    from services.voice.service import audio_format

    return engine.pipeline.prepare(audio, audio_format(common_pb2.AudioFormat(), "audio.format"), "verify")


def heard_answer(engine, digits: str, speaker: str, rng: random.Random, tries: int = 10,
                 subject: tuple[str, str] | None = None) -> bytes | None:
    """An answer of the speaker's genuine takes that the voice service's digit recogniser hears as
    ``digits`` and its synthetic-speech detector takes for bona fide (it refuses 2.7 % of genuine
    telephone speech, bench/RESULTS.md); None when no such combination turns up. The flows through
    the MFA are what these tests are about, not the recogniser's accuracy: the takes are chosen
    among the speaker's own recordings of the digits, as a caller repeats what the line did not
    carry. ``engine``: the running voice service's VoiceEngine. With ``subject`` (tenant, subject
    id), an assembly the subject's replay cache would take for an answer it already accepted is
    skipped too: a caller's answer is a new recording, ours are assembled from 7 takes per digit."""
    from services.voice import replay

    expected = digits.replace(" ", "")
    for _ in range(tries):
        audio = answer(expected, speaker, rng)
        prepared = _prepared(engine, audio)
        if subject is not None and engine.replay.is_replay(
                engine.replay.best_match(*subject, replay.fingerprint(prepared.samples))):
            continue
        if (engine.challenge_check(prepared, expected).passed
                and engine.synthetic_check(prepared, prepared.channel, True).passed):
            return audio
    return None
