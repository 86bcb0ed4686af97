import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from face_helpers import bomb_png, many_scan_jpeg
from services.face.imaging import DecodeErrorCode, DecodeLimits, ImageDecodeError, decode_image


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _code(data: bytes, limits: DecodeLimits = DecodeLimits()) -> DecodeErrorCode:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, limits)
    return err.value.code


def test_empty_bytes():
    assert _code(b"") is DecodeErrorCode.EMPTY_IMAGE


def test_text_file_is_unsupported():
    assert _code(b"hello, this is not an image\n" * 10) is DecodeErrorCode.UNSUPPORTED_FORMAT


def test_gif_is_unsupported():
    assert _code(_encode(Image.new("RGB", (64, 64)), "GIF")) is DecodeErrorCode.UNSUPPORTED_FORMAT


def test_truncated_jpeg(face_dir):
    data = (face_dir / "barack_obama" / "face_recognition_examples_obama.jpg").read_bytes()
    assert _code(data[: len(data) // 3]) is DecodeErrorCode.TRUNCATED_IMAGE
    assert _code(data[:20]) is DecodeErrorCode.TRUNCATED_IMAGE


def _code_and_peak_memory(data: bytes) -> tuple[DecodeErrorCode | None, int]:
    """The decode's refusal and the most memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        return _code(data), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_decompression_bomb_png_refused_from_the_header():
    """A real 20000x20000 grayscale PNG (400 MB of pixels, ~400 KB of bytes) is refused unread."""
    data = bomb_png()
    assert len(data) < 1_000_000
    code, peak = _code_and_peak_memory(data)
    assert code is DecodeErrorCode.IMAGE_TOO_LARGE
    assert peak < 5_000_000  # no pixel was decoded: the 400 MB were never allocated


def test_7000x7000_png_bomb_is_refused_without_decoding():
    """143 KB declaring 49 M pixels decoded into ~700 MB (issue 12); now refused from the header."""
    data = bomb_png(7000, 7000)
    assert len(data) < 200_000
    code, peak = _code_and_peak_memory(data)
    assert code is DecodeErrorCode.IMAGE_TOO_LARGE
    assert peak < 5_000_000  # the 147 MB of pixels were never allocated


def test_progressive_jpeg_of_many_scans_is_refused_from_its_markers():
    data = many_scan_jpeg(2000, 2000, repeats=200)
    Image.open(io.BytesIO(data)).load()  # a real image: libjpeg decodes it, every scan again
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.code is DecodeErrorCode.IMAGE_TOO_COMPLEX and "64 scans" in str(err.value)


def test_standard_progressive_jpeg_still_decodes():
    out = decode_image(_encode(Image.new("RGB", (640, 480), (10, 200, 30)), "JPEG", progressive=True))
    assert out.shape == (480, 640, 3)


def test_large_baseline_jpeg_is_decoded_scaled_down_and_a_large_progressive_one_refused():
    im = Image.new("RGB", (6000, 4000), (10, 200, 30))
    out = decode_image(_encode(im, "JPEG"))
    assert out.shape == (2000, 3000, 3)  # libjpeg's 1/2 scale: at most max_pixels decoded
    assert out.shape[0] * out.shape[1] <= DecodeLimits().max_pixels
    assert _code(_encode(im, "JPEG", progressive=True)) is DecodeErrorCode.IMAGE_TOO_LARGE


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"\xff\xd8\xff\xe0" + b"garbage" * 20,
                                  b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x01" * 40])
def test_errors_name_the_problem_not_the_decoder_library(data):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    text = str(err.value)
    assert err.value.code is DecodeErrorCode.TRUNCATED_IMAGE
    assert "object at" not in text and "0x" not in text and "BytesIO" not in text and "identify" not in text


def test_byte_limit():
    data = _encode(Image.new("RGB", (64, 64)), "PNG")
    assert _code(data, DecodeLimits(max_bytes=len(data) - 1)) is DecodeErrorCode.IMAGE_TOO_LARGE


@pytest.mark.parametrize("size", [(1, 1), (31, 200), (200, 8)])
def test_tiny_images_refused(size):
    assert _code(_encode(Image.new("RGB", size), "PNG")) is DecodeErrorCode.IMAGE_TOO_SMALL


def test_grayscale_becomes_three_channels():
    arr = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    out = decode_image(_encode(Image.fromarray(arr, "L"), "PNG"))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[..., 0] == arr).all() and (out[..., 1] == arr).all()


def test_alpha_is_composited_on_white():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 2] = 255  # blue
    rgba[:20, :, 3] = 255  # top half opaque, bottom half transparent
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out.shape == (40, 40, 3)
    assert tuple(out[5, 5]) == (255, 0, 0)  # opaque blue, in BGR
    assert tuple(out[35, 5]) == (255, 255, 255)


def test_exif_orientation_applied():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red (RGB)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_encode(im, "JPEG", exif=exif, quality=95))
    assert out.shape == (80, 40, 3)  # portrait after rotation
    # the red half (left) is now at the top; BGR red is channel 2
    assert out[5, 20, 2] > 200 and out[75, 20, 2] < 60


def test_webp_and_rgb_channel_order():
    arr = np.zeros((48, 48, 3), np.uint8)
    arr[..., 0] = 200  # red
    out = decode_image(_encode(Image.fromarray(arr), "WEBP", lossless=True))
    assert out.shape == (48, 48, 3) and out[0, 0, 2] == 200 and out[0, 0, 0] == 0


def test_fixture_formats_decode(verification_images):
    for p in verification_images:
        img = decode_image(p.read_bytes())
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8


def _pillow_bgr(data: bytes) -> np.ndarray:
    """The pixels as Pillow alone decodes them (upright by EXIF, RGB), in BGR order."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return np.ascontiguousarray(np.asarray(im.convert("RGB"))[..., ::-1])


def test_every_fixture_jpeg_decodes_to_pillows_pixels(fixtures_dir, monkeypatch):
    """A plain JPEG's pixels come from OpenCV's decoder (less CPU); they are Pillow's, bit for bit,
    on every JPEG of the fixtures (verification photos, webcam frames, attack prints and screens)."""
    import cv2

    calls: list[int] = []
    imdecode = cv2.imdecode

    def counted(*a):
        calls.append(1)
        return imdecode(*a)

    monkeypatch.setattr(cv2, "imdecode", counted)
    paths = sorted(p for p in (fixtures_dir / "face").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    assert len(paths) >= 50
    turned = 0
    for p in paths:
        data = p.read_bytes()
        assert np.array_equal(decode_image(data), _pillow_bgr(data)), p.name
        turned += Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) != 1
    assert turned >= 1 and len(calls) == len(paths) - turned  # Pillow turns the EXIF-rotated ones


def test_grey_and_turned_jpegs_decode_as_pillow_does():
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    data = _encode(Image.fromarray(grey, "L"), "JPEG", quality=90)
    assert np.array_equal(decode_image(data), _pillow_bgr(data))
    rgb = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _encode(Image.fromarray(rgb), "JPEG", exif=exif, quality=90)
        assert np.array_equal(decode_image(data), _pillow_bgr(data)), orientation


def test_a_jpeg_cut_anywhere_in_its_scan_is_refused(face_dir):
    """libjpeg fills a cut-off scan with grey; Pillow refuses the file, and so must the OpenCV path."""
    data = (face_dir / "barack_obama" / "face_recognition_examples_obama.jpg").read_bytes()
    for cut in (0.5, 0.9, 0.99):
        assert _code(data[: int(len(data) * cut)]) is DecodeErrorCode.TRUNCATED_IMAGE
    assert _code(data[:-2]) is DecodeErrorCode.TRUNCATED_IMAGE  # all but the end marker


def test_a_large_baseline_jpeg_of_odd_sides_is_decoded_scaled_down_too():
    """Pillow's draft picks the scale from whole quotients: asked for the rounded-up 1/2 size of a
    5001 px side (2501), it kept the full size, and a 20 MP photo was refused as too large."""
    out = decode_image(_encode(Image.new("RGB", (5001, 4001), (10, 200, 30)), "JPEG"))
    assert out.shape == (2001, 2501, 3)
