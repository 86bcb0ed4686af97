"""Helpers for the face tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.face.imaging import decode_image

CPU = ("CPUExecutionProvider",)


def load_bgr(path: Path) -> np.ndarray:
    return decode_image(Path(path).read_bytes())


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(w: int = 20000, h: int = 20000) -> bytes:
    """A real w x h grayscale PNG of zeros (400 MB of pixels at 20000x20000, ~400 KB of bytes)."""
    import struct
    import zlib

    comp = zlib.compressobj(9)
    row = b"\x00" * (w + 1)  # filter byte + one byte per pixel
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def many_scan_jpeg(w: int = 2000, h: int = 2000, repeats: int = 200) -> bytes:
    """A progressive JPEG whose last scan is repeated: libjpeg decodes every copy again (a pass over
    the whole image each), so a small file costs as much CPU as the attacker likes."""
    import io
    import re

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 130, 140)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rfind(b"\xff\xda")
    marker = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])").search(data, last + 2)
    assert marker is not None
    end = marker.start()
    return data[:end] + data[last:end] * repeats + data[end:]


def encode_png(image_bgr: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", image_bgr)[1].tobytes()


def two_faces(face_dir: Path) -> np.ndarray:
    """Two fixture faces of comparable size side by side."""
    a = load_bgr(face_dir / "bbt_penny" / "faceapi_penny1.png")
    b = load_bgr(face_dir / "bbt_raj" / "faceapi_raj1.png")
    return np.hstack([a, np.zeros((a.shape[0], 60, 3), np.uint8), b])
