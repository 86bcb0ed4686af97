"""Safe image decoding: JPEG, PNG and WebP bytes to a BGR uint8 array, in bounded memory and time.

The format is sniffed from the magic bytes and everything that decides the decoder's work is read
before any pixel is decoded: the declared size from the header, and for a JPEG its scans from the
marker structure. What is refused (IMAGE_TOO_LARGE, IMAGE_TOO_COMPLEX) costs a header parse:

* more pixels than ``max_pixels`` (4096 x 4096: a 7000 x 7000 PNG of 143 KB decoded into ~700 MB);
  a baseline JPEG may declare up to ``max_jpeg_pixels`` (a 50 MP phone photo), and is decoded at
  1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling to at most ``max_pixels``; a progressive JPEG keeps
  a full-size coefficient buffer whatever the scale, so it must fit ``max_pixels`` itself;
* a JPEG with more scans than ``max_jpeg_scans``: each scan walks the whole image again, so a
  progressive file that repeats scans by the thousand cost 30-72 s of CPU for 122 KB of bytes.
  Encoders write a handful (libjpeg's progressive script: 10 for colour, 6 for grey).

So a decode costs at most ``max_jpeg_scans`` passes over ``max_pixels``. EXIF orientation is applied;
grayscale, palette, 16-bit and alpha images all come out as 3-channel BGR. Messages name the limit
that was hit, never the decoder library's own text (which goes to the debug log).

Every check above is Pillow's lazy open and the marker walk; the pixels of a JPEG that needs none of
Pillow's own handling (RGB or grey, upright by its EXIF, decoded at full size, its end marker
present) come from OpenCV's decoder, straight to BGR: the same libjpeg-turbo pixels for ~27 % less
CPU (6.9 -> 5.0 ms per large fixture photo). That decoder is pluggable (:data:`JpegPixels`,
:func:`jpeg_decoder`): nvImageCodec's nvJPEG on a GPU, or its libjpeg-turbo backend on the CPU (the
tests' way of running that path without a GPU); every check and refusal stays Pillow's, and an image
the chosen decoder gives up on takes Pillow's path as OpenCV's refusals do.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import re
import threading
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger("biogate.face.imaging")


class DecodeErrorCode(str, Enum):
    EMPTY_IMAGE = "EMPTY_IMAGE"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    TRUNCATED_IMAGE = "TRUNCATED_IMAGE"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    IMAGE_TOO_COMPLEX = "IMAGE_TOO_COMPLEX"
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"


class ImageDecodeError(ValueError):
    """A client error (the service maps it to INVALID_ARGUMENT); ``code`` is machine-readable."""

    def __init__(self, code: DecodeErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 4096 * 4096  # decoded into memory: 48 MB as RGB
    max_jpeg_pixels: int = 50_000_000  # declared by a baseline JPEG (a 48 MP phone photo), decoded scaled down
    max_jpeg_scans: int = 64
    min_side: int = 32


# Start-of-frame markers of progressive JPEGs (SOF2, SOF6, SOF10, SOF14).
_PROGRESSIVE_SOF = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
_NO_LENGTH = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RSTn, SOI
# The end of entropy-coded data: 0xFF followed by a marker (not a stuffed 0x00, an RSTn or fill).
_MARKER_AFTER_SCAN = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


@dataclass(frozen=True)
class JpegStructure:
    progressive: bool
    scans: int  # counted up to the limit plus one
    complete: bool = False  # the walk reached the end-of-image marker: the data is not cut off


def jpeg_structure(data: bytes, max_scans: int) -> JpegStructure:
    """Walk a JPEG's markers (segment lengths, the entropy-coded data after each SOS) without
    decoding anything. A broken structure ends the walk; the decoder then reports it."""
    pos, scans, progressive, complete = 2, 0, False, False
    n = len(data)
    while pos + 2 <= n and scans <= max_scans:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            complete = scans > 0
            break
        if pos + 4 > n:
            break
        if marker in _NO_LENGTH:
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _PROGRESSIVE_SOF:
            progressive = True
        if marker == 0xDA:
            scans += 1
            found = _MARKER_AFTER_SCAN.search(data, end)
            end = found.start() if found else n
        pos = end
    return JpegStructure(progressive, scans, complete)


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name from the magic bytes, or None when it is not JPEG, PNG or WebP."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


# The pixels of a plain JPEG (see _plain_jpeg) as HxWx3 BGR uint8, EXIF orientation not applied; None
# when the decoder gives up on the data (the image then takes Pillow's path, which refuses or decodes).
JpegPixels = Callable[[bytes], np.ndarray | None]
JpegDecoderChoice = Literal["auto", "opencv", "nvimgcodec"]


def opencv_jpeg(data: bytes) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)


class NvImageCodecJpeg:
    """nvImageCodec's decoder (package ``nvidia-nvimgcodec-cu13``): nvJPEG on the current CUDA device
    (``gpu``, with its CPU backend for what nvJPEG does not take), or its libjpeg-turbo CPU backend
    alone (``cpu``, no GPU or driver needed). One decoder per calling thread: the service decodes on
    its server threads. Raises ImportError without the package, RuntimeError without a usable GPU."""

    def __init__(self, backend: Literal["gpu", "cpu"]) -> None:
        nvimgcodec = importlib.import_module("nvidia.nvimgcodec")  # optional: pyproject extra gpu

        self.backend = backend
        self._codec: Any = nvimgcodec
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                               sample_format=nvimgcodec.SampleFormat.I_BGR)
        self._local = threading.local()
        self._decoder()  # fails here, at start, when the backend cannot run

    def _decoder(self) -> Any:
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            n = self._codec
            if self.backend == "gpu":
                decoder = n.Decoder(backends=[n.Backend(n.BackendKind.GPU_ONLY), n.Backend(n.BackendKind.CPU_ONLY)])
            else:
                decoder = n.Decoder(device_id=n.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                                    backends=[n.Backend(n.BackendKind.CPU_ONLY)])
            self._local.decoder = decoder
        return decoder

    def __call__(self, data: bytes) -> np.ndarray | None:
        try:
            image = self._decoder().decode(self._codec.CodeStream(data), params=self._params)
        except Exception as exc:  # noqa: BLE001 - whatever it is, Pillow's path decides
            log.debug("nvImageCodec gave up on a JPEG", extra={"error": str(exc)})
            return None
        if image is None:
            return None
        if image.buffer_kind != self._codec.ImageBufferKind.STRIDED_HOST:
            image = image.cpu()
        return np.asarray(image)

    def decode_batch(self, datas: list[bytes]) -> list[np.ndarray | None]:
        """Several JPEGs in one call (nvJPEG decodes a batch together); None where it gave up."""
        streams = [self._codec.CodeStream(d) for d in datas]
        images = self._decoder().decode(streams, params=self._params)
        return [None if im is None else np.asarray(im if im.buffer_kind == self._codec.ImageBufferKind.STRIDED_HOST
                                                   else im.cpu()) for im in images]


def jpeg_decoder(choice: JpegDecoderChoice, cuda: bool) -> tuple[JpegPixels, str]:
    """The JPEG pixel decoder of ``face.jpeg_decoder`` and its name for the health details. ``cuda``:
    the models run on CUDA. ``auto`` is nvImageCodec on the GPU when ``cuda`` and the package loads
    and finds the GPU, else OpenCV; ``nvimgcodec`` is nvImageCodec on the GPU when ``cuda``, else on
    its CPU backend, and fails when the package is missing."""
    if choice == "opencv":
        return opencv_jpeg, "opencv"
    if choice == "nvimgcodec":
        nv = NvImageCodecJpeg("gpu" if cuda else "cpu")
        return nv, f"nvimgcodec-{nv.backend}"
    if cuda:
        try:
            return NvImageCodecJpeg("gpu"), "nvimgcodec-gpu"
        except (ImportError, RuntimeError) as exc:
            log.info("JPEG decode stays on OpenCV: nvImageCodec's GPU decoder is unavailable",
                     extra={"error": str(exc)[:300]})
    return opencv_jpeg, "opencv"


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), jpeg: JpegPixels = opencv_jpeg) -> np.ndarray:
    """Decode ``data`` to an HxWx3 BGR uint8 array, or raise :class:`ImageDecodeError`. ``jpeg``
    decodes the pixels of a plain JPEG once Pillow's checks have passed."""
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
            im: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])  # lazy: parses the header only
        except Image.DecompressionBombError:
            raise ImageDecodeError(DecodeErrorCode.IMAGE_TOO_LARGE, "the header declares too many pixels") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            log.debug("image header refused", extra={"format": fmt, "error": str(exc)})
            raise ImageDecodeError(DecodeErrorCode.TRUNCATED_IMAGE, f"the {fmt} header is damaged or cut off") from None
        width, height = im.size
        if min(width, height) < limits.min_side:
            raise ImageDecodeError(
                DecodeErrorCode.IMAGE_TOO_SMALL, f"{width}x{height}: a side < {limits.min_side}"
            )
        structure = None
        if fmt == "JPEG":
            structure = _bound_jpeg(im, data, limits)
        elif width * height > limits.max_pixels:
            raise ImageDecodeError(
                DecodeErrorCode.IMAGE_TOO_LARGE, f"{width}x{height} > {limits.max_pixels} pixels"
            )
        try:
            if structure is not None and _plain_jpeg(im, structure, (width, height)):
                bgr = jpeg(data)
                if bgr is not None and bgr.shape == (height, width, 3):
                    return bgr
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # not a copy of an image it leaves as it is
        except Image.DecompressionBombError:
            raise ImageDecodeError(DecodeErrorCode.IMAGE_TOO_LARGE, "the image holds too many pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            log.debug("image data refused", extra={"format": fmt, "error": str(exc)})
            raise ImageDecodeError(DecodeErrorCode.TRUNCATED_IMAGE, f"the {fmt} data is damaged or cut off") from None
    # cv2's channel swap, not a reversed numpy view copied: the same pixels in a sixth of the time.
    return cv2.cvtColor(np.asarray(_to_rgb(im), dtype=np.uint8), cv2.COLOR_RGB2BGR)


def _plain_jpeg(im: Image.Image, structure: JpegStructure, declared: tuple[int, int]) -> bool:
    """Whether OpenCV's decoder gives this JPEG's pixels exactly as Pillow's path would: RGB or grey
    (not CMYK), no EXIF turn (Pillow's reading of the tag, as ``exif_transpose`` reads it), not
    scaled by ``draft``, and its end marker present (Pillow refuses a cut-off file; libjpeg would
    fill the missing scan with grey, and OpenCV 5.0 refuses it too, but that is OpenCV's choice
    and builds differ)."""
    return (im.mode in ("RGB", "L") and structure.complete and im.size == declared
            and im.getexif().get(0x0112, 1) == 1)


def _bound_jpeg(im: Image.Image, data: bytes, limits: DecodeLimits) -> JpegStructure:
    """Refuse a JPEG whose decode would cost more than the limits allow; scale a large baseline
    one down in the decoder (libjpeg's DCT scaling) so that at most ``max_pixels`` are decoded."""
    width, height = im.size
    structure = jpeg_structure(data, limits.max_jpeg_scans)
    if structure.scans > limits.max_jpeg_scans:
        raise ImageDecodeError(DecodeErrorCode.IMAGE_TOO_COMPLEX,
                               f"a JPEG of more than {limits.max_jpeg_scans} scans; save it again with a standard encoder")
    if width * height <= limits.max_pixels:
        return structure
    if structure.progressive or width * height > limits.max_jpeg_pixels:
        limit = limits.max_pixels if structure.progressive else limits.max_jpeg_pixels
        kind = "progressive JPEG" if structure.progressive else "JPEG"
        raise ImageDecodeError(DecodeErrorCode.IMAGE_TOO_LARGE, f"{width}x{height} {kind} > {limit} pixels")
    scale = next(k for k in (2, 4, 8) if math.ceil(width / k) * math.ceil(height / k) <= limits.max_pixels
                 or k == 8)
    im.draft(im.mode, (width // scale, height // scale))  # Pillow's draft takes the scale from whole quotients
    if im.size[0] * im.size[1] > limits.max_pixels:
        raise ImageDecodeError(DecodeErrorCode.IMAGE_TOO_LARGE, f"{width}x{height} > {limits.max_pixels} pixels")
    return structure


def _to_rgb(im: Image.Image) -> Image.Image:
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not has_alpha:
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            # 16-bit/float grayscale: scale to 8 bits instead of letting convert() clip it.
            arr = np.asarray(im, dtype=np.float32)
            hi = float(arr.max()) or 1.0
            im = Image.fromarray((arr * (255.0 / max(hi, 255.0))).astype(np.uint8), "L")
        return im if im.mode == "RGB" else im.convert("RGB")
    # Transparent pixels become white: cut-out portraits are usually shown on white.
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
