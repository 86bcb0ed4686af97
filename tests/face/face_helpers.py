"""Helpers for the face tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.face.imaging import decode_image

CPU = ("CPUExecutionProvider",)


def load_bgr(path: Path) -> np.ndarray:
    return decode_image(Path(path).read_bytes())
