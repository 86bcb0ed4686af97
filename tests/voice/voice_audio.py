"""Test audio helpers (no biometric content: tones, or reads of the shared fixtures)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf


def read(path: Path) -> np.ndarray:
    x, rate = sf.read(path, dtype="float32")
    assert rate == 16000
    return x


def wav_bytes(x: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(freqs, seconds: float, rate: int = 16000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * sum(np.sin(2 * np.pi * f * t) for f in freqs)).astype(np.float32)
