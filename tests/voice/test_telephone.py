import numpy as np
import pytest

from services.voice import telephone
from services.voice.ingest import AudioFormat, Encoding, ingest
from voice_audio import tone


def band_energy(x, rate, lo, hi):
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / rate)
    return spec[(f >= lo) & (f < hi)].sum()


def test_encode_gives_8k_g711_bytes():
    x = tone([1000], 1.0)
    codes = telephone.encode(x, 16000)
    assert isinstance(codes, bytes) and len(codes) == 8000
    assert len(telephone.encode(x, 16000, "alaw")) == 8000


@pytest.mark.parametrize("freq,kept", [(100, False), (1000, True), (3000, True), (5000, False)])
def test_band_pass_300_3400(freq, kept):
    x = tone([freq], 1.0, amp=0.5)
    y = telephone.simulate(x, 16000)
    assert len(y) == len(x)
    ratio = np.sum(y[4000:] ** 2) / np.sum(x[4000:] ** 2)
    assert (ratio > 0.5) if kept else (ratio < 0.05)


def test_channel_output_enters_ingest_as_mulaw():
    x = tone([300, 700, 1500], 2.0, amp=0.2)
    out = ingest(telephone.encode(x), AudioFormat(Encoding.MULAW))
    assert out.source_rate == 8000 and out.channel == "telephone"
    assert abs(len(out.samples) - len(x)) <= 2
    assert band_energy(out.samples, 16000, 4000, 8000) < 1e-4 * band_energy(out.samples, 16000, 300, 3400)
