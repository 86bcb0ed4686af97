"""The challenge arm's answers: the asked digits in the speaker's answer takes, at 16 kHz, with pauses."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import SHARED, require


@pytest.fixture(autouse=True)
def digit_fixtures() -> None:
    require((SHARED / "fixtures" / "voice" / "digits").is_dir(), "the spoken-digit fixtures (../shared/fixtures/voice/digits)")


def test_answer_is_the_asked_digits_in_answer_takes_with_pauses() -> None:
    from bench.voice_challenge_bench import PAUSE_S, Answers
    from tests.mfa import spoken_digits as sd

    answers = Answers(seed=1)
    assert all(len(v) == len(sd.ANSWER_TAKES) for v in answers.takes.values())
    x = np.frombuffer(answers.answer("george", "4 7 1"), "<i2").astype(np.float32) / 32767
    pause = int(PAUSE_S * 16000)
    assert not x[:pause].any() and not x[-pause:].any()
    pieces, k = [], pause
    for d in (4, 7, 1):  # each piece one of the speaker's answer takes of that digit
        take = next(t for t in answers.takes[("george", d)] if np.allclose(x[k:k + len(t)], np.clip(t, -1, 1), atol=1e-4))
        pieces.append(take)
        k += len(take) + pause
    assert k == len(x)
