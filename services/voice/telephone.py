"""Telephone channel simulation for tests and evaluation: what an IVR receives from a caller.

Band-pass 300-3400 Hz (4th-order Butterworth, causal), resample to 8 kHz (soxr HQ), G.711 encode.
:func:`encode` gives the G.711 bytes a caller's telephone network would deliver;
:func:`simulate` decodes them and returns to the input rate, for measuring embeddings under the
channel without going through ingest.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import soxr
from numpy.typing import NDArray
from scipy.signal import butter, sosfilt

from . import g711

TELEPHONE_RATE = 8000
BAND_HZ = (300.0, 3400.0)
Law = Literal["mulaw", "alaw"]


def band_limit(x: NDArray[np.float32], sample_rate: int) -> NDArray[np.float32]:
    sos = butter(4, BAND_HZ, btype="bandpass", fs=sample_rate, output="sos")
    return sosfilt(sos, np.asarray(x, dtype=np.float64)).astype(np.float32)


def narrowband(x: NDArray[np.float32], sample_rate: int = 16000) -> NDArray[np.float32]:
    """``x`` through 8 kHz and back: narrowband speech in a ``sample_rate`` clip, as a Bluetooth
    headset gives a phone app (no line filter, no companding: that is :func:`encode`)."""
    down = soxr.resample(np.asarray(x, dtype=np.float32), sample_rate, TELEPHONE_RATE, quality="HQ")
    return np.asarray(soxr.resample(down, TELEPHONE_RATE, sample_rate, quality="HQ"), dtype=np.float32)


def encode(x: NDArray[np.float32], sample_rate: int = 16000, law: Law = "mulaw") -> bytes:
    """Float audio (full scale +-1) -> G.711 bytes at 8 kHz after the telephone band-pass."""
    y = soxr.resample(band_limit(x, sample_rate), sample_rate, TELEPHONE_RATE, quality="HQ")
    pcm = np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16)
    codes = g711.ulaw_encode(pcm) if law == "mulaw" else g711.alaw_encode(pcm)
    return codes.tobytes()


def decode(codes: bytes, law: Law = "mulaw") -> NDArray[np.float32]:
    """G.711 bytes -> float audio at 8 kHz."""
    pcm = g711.ulaw_decode(codes) if law == "mulaw" else g711.alaw_decode(codes)
    return pcm.astype(np.float32) / 32768.0


def simulate(x: NDArray[np.float32], sample_rate: int = 16000, law: Law = "mulaw") -> NDArray[np.float32]:
    """The audio after a telephone channel, back at ``sample_rate``."""
    y = decode(encode(x, sample_rate, law), law)
    return soxr.resample(y, TELEPHONE_RATE, sample_rate, quality="HQ").astype(np.float32)
