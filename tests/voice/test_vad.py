import numpy as np
import pytest

from services.voice.vad import SileroVad
from voice_audio import read, tone


@pytest.fixture(scope="module")
def vad(voice_models):
    return SileroVad(voice_models.vad)


def test_net_speech_on_a_fixture(vad, voice_dir):
    x = read(voice_dir / "speechbrain_spk1" / "spk1_snt1.wav")  # 2.87 s of continuous speech
    r = vad(x)
    assert r.duration_s == pytest.approx(len(x) / 16000)
    assert 2.3 <= r.speech_s <= 2.87
    assert r.segments and all(0 <= s < e <= len(x) for s, e in r.segments)


def test_pauses_are_not_counted(vad, voice_dir):
    x = read(voice_dir / "speechbrain_spk1" / "spk1_snt1.wav")
    padded = np.concatenate([np.zeros(16000, np.float32), x, np.zeros(24000, np.float32), x])
    r = vad(padded)
    assert r.duration_s == pytest.approx(len(padded) / 16000)
    assert r.speech_s == pytest.approx(2 * vad(x).speech_s, abs=0.2)
    assert r.segments[0][0] >= 16000 - 512 * 2  # nothing before the first second of silence


@pytest.mark.parametrize("signal", ["silence", "tone", "noise"])
def test_no_speech(vad, signal):
    x = {"silence": np.zeros(32000, np.float32), "tone": tone([1000], 2.0),
         "noise": np.random.default_rng(0).normal(0, 0.01, 32000).astype(np.float32)}[signal]
    assert vad(x).speech_s == 0.0


def test_stream_in_20ms_chunks_equals_whole_clip(vad, voice_dir):
    x = read(voice_dir / "libri_3005" / "3005-163389-0000.wav")
    whole = vad(x)
    s = vad.stream()
    progress = []
    for i in range(0, len(x), 320):
        s.push(x[i : i + 320])
        progress.append(s.speech_s)
    streamed = s.finish()
    reference = vad.stream()
    reference.push(x)
    reference.finish()
    assert streamed == whole and s.probs == reference.probs
    assert progress == sorted(progress)  # never revised downwards, safe to act on
    assert progress[-1] <= whole.speech_s + 1e-9
