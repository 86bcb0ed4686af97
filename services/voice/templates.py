"""Voice templates at rest: the L2-normalised mean ECAPA embedding of the enrolment utterances,
sealed by the runtime's envelope crypto bound to (tenant, subject, "voice", model, channel)."""

from __future__ import annotations

import numpy as np

_MAGIC = b"BGV1"  # BioGate voice template, format 1: magic, then float32 little-endian values


def encode_template(embedding: np.ndarray) -> bytes:
    return _MAGIC + np.asarray(embedding, dtype="<f4").reshape(-1).tobytes()


def decode_template(data: bytes) -> np.ndarray:
    if data[:4] != _MAGIC or (len(data) - 4) % 4:
        raise ValueError("not a voice template of format 1")
    return np.frombuffer(data, dtype="<f4", offset=4).astype(np.float32)
