"""The digital-silence cut before the AASIST window (voice.antispoof_cut_digital_silence) and the
sender-side variants of espeak-ng the calibration attacks with (services/voice/attacks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from services.settings import load_config
from services.voice import attacks
from services.voice.antispoof import (DIGITAL_SILENCE, MIN_DIGITAL_SILENCE, digital_silence_runs, speech_window,
                                      without_digital_silence)
from services.voice.config import voice_config
from services.voice.engine import antispoof_cut, pad_score_name


def clip() -> np.ndarray:
    """0.1 s of noise, 400 zero samples (a run), 0.1 s of noise, 200 zero samples (too short), 0.1 s."""
    rng = np.random.default_rng(0)
    speech = [(0.1 * rng.standard_normal(1600)).astype(np.float32) for _ in range(3)]
    return np.concatenate([speech[0], np.zeros(400, np.float32), speech[1], np.zeros(200, np.float32), speech[2]])


def test_only_runs_of_20_ms_within_one_step_are_cut_and_segments_follow():
    x = clip()
    x[1600 + 10] = DIGITAL_SILENCE  # one PCM-16 step still counts as silence
    y, segments = without_digital_silence(x, ((0, 1600), (2000, 3600), (3800, 5400)))
    assert len(y) == len(x) - 400
    assert np.array_equal(y[:1600], x[:1600]) and np.array_equal(y[1600:], x[2000:])
    assert segments == ((0, 1600), (1600, 3200), (3400, 5000))
    # A step above one PCM-16 step splits the run: no part of it is long enough.
    x[1600 + 200] = 3 * DIGITAL_SILENCE
    assert len(without_digital_silence(x)[0]) == len(x)


def test_clip_of_silence_only_is_left_whole():
    x = np.zeros(4 * MIN_DIGITAL_SILENCE, np.float32)
    y, segments = without_digital_silence(x, ((0, 10),))
    assert len(y) == len(x) and segments == ((0, 10),)


def test_window_is_placed_after_the_cut():
    x = clip()
    segments = ((0, 1600), (2000, 3600), (3800, 5400))
    before = speech_window(x, segments, 3200)
    after = speech_window(*without_digital_silence(x, segments), 3200)
    assert np.count_nonzero(before == 0) >= 200  # a zero run inside the window
    assert not np.array_equal(before, after) and np.count_nonzero(after == 0) < 250


def test_sender_variants():
    x = clip()
    trimmed = attacks.trimmed(x)
    filled = attacks.noise_filled(x, seed=1)
    assert len(trimmed) == len(x) - 400 and not len(digital_silence_runs(trimmed)[0])
    assert len(filled) == len(x) and not len(digital_silence_runs(filled)[0])
    gap = filled[1600:2000]
    level = 20 * np.log10(np.sqrt(np.mean(gap.astype(np.float64) ** 2)) / np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert level == pytest.approx(attacks.NOISE_FILL_DB, abs=1.5)
    assert np.array_equal(filled[3600:3800], x[3600:3800])  # the short run is left as it was
    assert np.array_equal(attacks.noise_filled(x, seed=1), filled)
    assert set(attacks.SENDER_VARIANTS) == {"", "trimmed", "noisefill"}


def test_the_option_is_typed_and_names_the_score(monkeypatch):
    monkeypatch.setenv("BIOGATE_VOICE__ANTISPOOF_CUT_DIGITAL_SILENCE", '["telephone"]')
    cfg = voice_config(load_config(None))
    assert not antispoof_cut(cfg, "wideband") and antispoof_cut(cfg, "telephone")
    assert pad_score_name(4.04, True) == "bonafide_log_odds@speech4.04s-zerocut"
    assert pad_score_name(3.0) == "bonafide_log_odds@speech3s"
    monkeypatch.setenv("BIOGATE_VOICE__ANTISPOOF_CUT_DIGITAL_SILENCE", '["landline"]')
    with pytest.raises(Exception, match="antispoof_cut_digital_silence"):
        voice_config(load_config(None))


def test_the_cut_is_on_where_its_record_shipped(monkeypatch):
    """Telephone: the refit record (cut on) passed its ship rule; wideband did not and keeps the
    record without the cut (bench/RESULTS.md, "AASIST refitted with the cut")."""
    monkeypatch.delenv("BIOGATE_VOICE__ANTISPOOF_CUT_DIGITAL_SILENCE", raising=False)
    cfg = voice_config(load_config(None))
    assert antispoof_cut(cfg, "telephone") and not antispoof_cut(cfg, "wideband")
