"""G.711 mu-law and A-law codecs (ITU-T G.711), vectorised with numpy.

The stdlib ``audioop`` is deprecated (3.11) and removed (3.13), so the codec is written here after
the reference g711.c (Sun Microsystems, public domain). Decoding uses 256-entry tables; encoding
follows the reference segment search exactly, so ``encode(decode(code)) == code`` for every code
(except that mu-law's negative zero 0x7F encodes back as 0xFF).
Linear samples are int16-scaled integers.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # 14-bit magnitude limit after the >> 2
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _ulaw_table() -> NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + _ULAW_BIAS) << exponent) - _ULAW_BIAS
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> NDArray[np.int16]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


ULAW_TO_LINEAR: NDArray[np.int16] = _ulaw_table()
ALAW_TO_LINEAR: NDArray[np.int16] = _alaw_table()


def ulaw_decode(codes: bytes | ArrayLike) -> NDArray[np.int16]:
    return ULAW_TO_LINEAR[_as_codes(codes)]


def alaw_decode(codes: bytes | ArrayLike) -> NDArray[np.int16]:
    return ALAW_TO_LINEAR[_as_codes(codes)]


def ulaw_encode(pcm: ArrayLike) -> NDArray[np.uint8]:
    x = np.asarray(pcm, dtype=np.int32) >> 2
    mask = np.where(x < 0, 0x7F, 0xFF)
    x = np.minimum(np.abs(x), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, x, side="left")
    uval = (seg << 4) | ((x >> (seg + 1)) & 0x0F)
    uval = np.where(seg >= 8, 0x7F, uval)
    return (uval ^ mask).astype(np.uint8)


def alaw_encode(pcm: ArrayLike) -> NDArray[np.uint8]:
    x = np.asarray(pcm, dtype=np.int32) >> 3
    negative = x < 0
    mask = np.where(negative, 0x55, 0xD5)
    x = np.where(negative, -x - 1, x)
    seg = np.searchsorted(_ALAW_SEG_END, x, side="left")
    shift = np.where(seg < 2, 1, seg)
    aval = (seg << 4) | ((x >> shift) & 0x0F)
    aval = np.where(seg >= 8, 0x7F, aval)
    return (aval ^ mask).astype(np.uint8)


def _as_codes(codes: bytes | ArrayLike) -> NDArray[np.uint8]:
    if isinstance(codes, (bytes, bytearray, memoryview)):
        return np.frombuffer(codes, dtype=np.uint8)
    return np.asarray(codes, dtype=np.uint8)
