"""Simulated presentation attacks, for tests, calibration and benchmarks (never used to decide).

* :func:`loudspeaker_room`: a recording played through a small loudspeaker into a room and
  captured again (band-limited speaker response, a short synthetic room impulse response, noise).
* :func:`espeak`: text-to-speech with espeak-ng (installed by scripts/setup.sh from Debian).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from numpy.typing import NDArray
from scipy.signal import butter, fftconvolve, sosfilt

FloatArray = NDArray[np.float32]

# Texts and espeak-ng voices of the synthetic-speech attack sets (bench and `biogate voice attacks`).
SENTENCES = (
    "Please verify my identity so that I can access my account.",
    "My voice is my password, and I would like to transfer some money today.",
    "I am calling about the recent charges on my credit card statement.",
    "Could you tell me the balance of my savings account, please?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "I would like to report a lost card and order a replacement.",
    "Four seven one nine two eight.",
    "Yesterday I paid my electricity bill and my rent from the current account.",
    "Three one four one five nine two six.",
    "Good morning, I need to change the address on my account.",
)
# Variant names are file names (case-sensitive): a misspelt one silently gives the base voice.
# tests/voice/test_layers.py holds other voices out, to measure what calibration did not see.
VOICES = ("en-us", "en", "en-us+m3", "en+f2", "en-us+f4", "en-us+klatt", "en-gb-x-rp", "en+m7",
          "en-gb-scotland", "en-us+f3", "en-029+m2", "en-us-nyc+klatt3", "en-gb-x-gbclan+f5", "en+Annie",
          "en-us+Andy", "en-gb-x-gbcwmd+f1", "en-us+linda", "en+steph", "en-us+belinda", "en+Andrea",
          "en-us+anika", "en+max", "en-us+Mike", "en+Michael", "en-us+klatt5", "en+klatt6", "en-us+m1",
          "en+f5", "en-029+f2", "en-us-nyc+paul", "en-gb-scotland+Lee", "en-us+Gene")


def room_impulse_response(rate: int, rt60_s: float, rng: np.random.Generator) -> FloatArray:
    """Direct path, a few early reflections, then exponentially decaying noise (the late tail)."""
    n = int(rt60_s * rate)
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s) * 0.3
    tail[: int(0.005 * rate)] = 0.0
    ir = tail
    ir[0] = 1.0
    for delay_ms, gain in ((3.1, 0.5), (7.4, 0.35), (11.9, 0.25)):
        ir[int(delay_ms * rate / 1000)] += gain * rng.choice((-1.0, 1.0))
    return (ir / np.sqrt(np.sum(ir**2))).astype(np.float32)


def loudspeaker_room(x: FloatArray, rate: int = 16000, rt60_s: float = 0.25, snr_db: float = 25.0,
                     seed: int = 0) -> FloatArray:
    rng = np.random.default_rng(seed)
    speaker = butter(4, (250.0, min(6500.0, rate * 0.45)), btype="bandpass", fs=rate, output="sos")
    y = sosfilt(speaker, np.asarray(x, dtype=np.float64))
    y = np.tanh(2.0 * y) / 2.0  # the small speaker's soft saturation
    y = fftconvolve(y, room_impulse_response(rate, rt60_s, rng))[: len(x)]
    noise = rng.standard_normal(len(y))
    gain = np.sqrt(np.mean(y**2) / (np.mean(noise**2) * 10 ** (snr_db / 10)))
    y = y + gain * noise
    return (0.5 * y / max(np.max(np.abs(y)), 1e-9)).astype(np.float32)


def resample(x: FloatArray, rate_in: int, rate_out: int) -> FloatArray:
    return soxr.resample(np.asarray(x, dtype=np.float32), rate_in, rate_out, quality="HQ").astype(np.float32)


def espeak(text: str, voice: str = "en-us", speed: int = 150, gap: int = 0, rate: int = 16000) -> FloatArray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (scripts/setup.sh installs it: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tts.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-g", str(gap), "-w", str(path), text],
                       check=True, capture_output=True, timeout=60)
        y, native = sf.read(path, dtype="float32")
    return resample(y, native, rate)
