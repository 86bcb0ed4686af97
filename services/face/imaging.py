"""Safe image decoding: JPEG, PNG and WebP bytes to a BGR uint8 array.

The format is sniffed from the magic bytes and the size read from the header before any pixel is
decoded, so decompression bombs are refused at the cost of parsing a header. EXIF orientation is
applied; grayscale, palette, 16-bit and alpha images all come out as 3-channel BGR.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeErrorCode(str, Enum):
    EMPTY_IMAGE = "EMPTY_IMAGE"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    TRUNCATED_IMAGE = "TRUNCATED_IMAGE"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"


class ImageDecodeError(ValueError):
    """A client error (the service maps it to INVALID_ARGUMENT); ``code`` is machine-readable."""

    def __init__(self, code: DecodeErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 50_000_000  # a 48 MP phone photo passes
    min_side: int = 32


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name from the magic bytes, or None when it is not JPEG, PNG or WebP."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode ``data`` to an HxWx3 BGR uint8 array, or raise :class:`ImageDecodeError`."""
    if not data:
        raise ImageDecodeError(DecodeErrorCode.EMPTY_IMAGE, "no image bytes")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(
            DecodeErrorCode.IMAGE_TOO_LARGE, f"{len(data)} bytes > {limits.max_bytes}"
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError(DecodeErrorCode.UNSUPPORTED_FORMAT, "not JPEG, PNG or WebP")
    with warnings.catch_warnings():
        # Pillow's own bomb check warns/raises on its global limit; ours below is the one that counts.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])  # lazy: parses the header only
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(DecodeErrorCode.IMAGE_TOO_LARGE, str(exc)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(DecodeErrorCode.TRUNCATED_IMAGE, f"bad {fmt} header: {exc}") from None
        width, height = im.size
        if width * height > limits.max_pixels:
            raise ImageDecodeError(
                DecodeErrorCode.IMAGE_TOO_LARGE, f"{width}x{height} > {limits.max_pixels} pixels"
            )
        if min(width, height) < limits.min_side:
            raise ImageDecodeError(
                DecodeErrorCode.IMAGE_TOO_SMALL, f"{width}x{height}: a side < {limits.min_side}"
            )
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(DecodeErrorCode.IMAGE_TOO_LARGE, str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageDecodeError(DecodeErrorCode.TRUNCATED_IMAGE, f"{fmt} data: {exc}") from None
    rgb = _to_rgb(im)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[:, :, ::-1])


def _to_rgb(im: Image.Image) -> Image.Image:
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not has_alpha:
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            # 16-bit/float grayscale: scale to 8 bits instead of letting convert() clip it.
            arr = np.asarray(im, dtype=np.float32)
            hi = float(arr.max()) or 1.0
            im = Image.fromarray((arr * (255.0 / max(hi, 255.0))).astype(np.uint8), "L")
        return im.convert("RGB")
    # Transparent pixels become white: cut-out portraits are usually shown on white.
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
