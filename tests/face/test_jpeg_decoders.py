"""face.jpeg_decoder: nvImageCodec's decoder path, run on its CPU backend (libjpeg-turbo; no GPU or
driver here), against OpenCV's on the fixture JPEGs, and the fallback when the package is missing.
On a GPU its nvJPEG backend is the same code path with another backend (bench/gpu_bench.py --part jpeg)."""

from __future__ import annotations

import dataclasses
import io
import sys

import numpy as np
import pytest
from PIL import Image

from face_helpers import CPU, many_scan_jpeg
from services.face.imaging import (
    DecodeErrorCode,
    DecodeLimits,
    ImageDecodeError,
    NvImageCodecJpeg,
    decode_image,
    jpeg_decoder,
    opencv_jpeg,
)
from services.face.pipeline import FacePipeline


@pytest.fixture(scope="module")
def nv_cpu() -> NvImageCodecJpeg:
    return NvImageCodecJpeg("cpu")


@pytest.fixture(scope="module")
def fixture_jpegs(fixtures_dir) -> list[bytes]:
    paths = sorted(p for p in (fixtures_dir / "face").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    assert len(paths) > 100
    return [p.read_bytes() for p in paths]


def _outcome(data: bytes, jpeg, limits: DecodeLimits = DecodeLimits()) -> np.ndarray | tuple[DecodeErrorCode, str]:
    try:
        return decode_image(data, limits, jpeg)
    except ImageDecodeError as err:
        return err.code, str(err)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    return a == b


def test_the_cpu_backend_gives_opencvs_pixels_on_every_fixture_jpeg(nv_cpu, fixture_jpegs):
    """Max abs difference 0 on every fixture JPEG (both are libjpeg-turbo with the same IDCT), and the
    nvImageCodec decoder decoded every JPEG that OpenCV's decoder is given (none was left to Pillow)."""
    done: dict[str, int] = {"opencv": 0, "nvimgcodec": 0}

    def counted(name: str, decoder):
        def decode(data: bytes) -> np.ndarray | None:
            out = decoder(data)
            done[name] += out is not None
            return out
        return decode

    for data in fixture_jpegs:
        ref = decode_image(data, jpeg=counted("opencv", opencv_jpeg))
        out = decode_image(data, jpeg=counted("nvimgcodec", nv_cpu))
        assert out.dtype == np.uint8 and out.shape == ref.shape and out.flags.c_contiguous
        assert int(np.abs(out.astype(np.int16) - ref).max()) == 0
    assert done["nvimgcodec"] == done["opencv"] > len(fixture_jpegs) // 2, done


def test_the_cpu_backend_gives_up_where_opencv_does(nv_cpu, fixture_jpegs):
    """Bytes flipped in the entropy-coded data, and cut-off files: both decoders return the same
    (libjpeg-turbo recovers the same pixels, or both give up)."""
    rng = np.random.default_rng(13)
    for data in fixture_jpegs[::25]:
        for _ in range(4):
            broken = bytearray(data)
            pos = int(rng.integers(len(data) // 4, len(data)))
            broken[pos] ^= int(rng.integers(1, 256))
            assert _same(nv_cpu(bytes(broken)), opencv_jpeg(bytes(broken)))
        assert nv_cpu(data[: len(data) // 2]) is None or _same(nv_cpu(data[: len(data) // 2]),
                                                                 opencv_jpeg(data[: len(data) // 2]))


def test_a_batch_gives_each_images_pixels_and_none_where_it_gives_up(nv_cpu, fixture_jpegs):
    batch = fixture_jpegs[:12] + [fixture_jpegs[0][: len(fixture_jpegs[0]) // 2], b"\xff\xd8\xff not a jpeg"]
    out = nv_cpu.decode_batch(batch)
    assert len(out) == len(batch) and out[-1] is None and out[-2] is None
    for data, got in zip(batch[:-2], out[:-2], strict=True):
        assert _same(got, opencv_jpeg(data))


def _encode(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_every_refusal_and_pillow_path_is_unchanged(nv_cpu, fixture_jpegs):
    """Pillow's checks come first whatever decodes the pixels: each crafted or damaged input gives the
    same error (code and message) or the same pixels with either decoder."""
    face = fixture_jpegs[0]
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (300, 400, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = [
        (b"", DecodeLimits()),
        (face[:20], DecodeLimits()),
        (face[: len(face) // 3], DecodeLimits()),
        (face, DecodeLimits(max_bytes=len(face) - 1)),
        (many_scan_jpeg(600, 600, repeats=80), DecodeLimits()),
        (_encode(Image.new("RGB", (6000, 4000), (10, 200, 30))), DecodeLimits()),  # scaled by draft
        (_encode(Image.new("RGB", (6000, 4000), (10, 200, 30)), progressive=True), DecodeLimits()),
        (_encode(Image.fromarray(pixels).convert("CMYK")), DecodeLimits()),
        (_encode(Image.fromarray(pixels), exif=exif.tobytes()), DecodeLimits()),
        (_encode(Image.fromarray(pixels), progressive=True), DecodeLimits()),
        (_encode(Image.fromarray(pixels[:, :, 0])), DecodeLimits()),  # grey
        (_encode(Image.fromarray(pixels[:20])), DecodeLimits()),  # too small
    ]
    codes = set()
    for data, limits in cases:
        ref, out = _outcome(data, opencv_jpeg, limits), _outcome(data, nv_cpu, limits)
        assert _same(out, ref), (type(ref), ref if isinstance(ref, tuple) else ref.shape)
        if isinstance(ref, tuple):
            codes.add(ref[0])
    assert codes == {DecodeErrorCode.EMPTY_IMAGE, DecodeErrorCode.TRUNCATED_IMAGE, DecodeErrorCode.IMAGE_TOO_LARGE,
                     DecodeErrorCode.IMAGE_TOO_COMPLEX, DecodeErrorCode.IMAGE_TOO_SMALL}


def test_auto_and_explicit_choices():
    assert jpeg_decoder("opencv", cuda=True) == (opencv_jpeg, "opencv")
    assert jpeg_decoder("auto", cuda=False) == (opencv_jpeg, "opencv")  # on the CPU OpenCV is as fast
    decoder, name = jpeg_decoder("nvimgcodec", cuda=False)
    assert isinstance(decoder, NvImageCodecJpeg) and decoder.backend == "cpu" and name == "nvimgcodec-cpu"


def test_without_the_package_auto_falls_back_to_opencv_and_explicit_fails(monkeypatch):
    """sys.modules None: the import of nvidia.nvimgcodec raises ModuleNotFoundError, as when the
    optional package is not installed."""
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    assert jpeg_decoder("auto", cuda=True) == (opencv_jpeg, "opencv")
    with pytest.raises(ImportError):
        jpeg_decoder("nvimgcodec", cuda=False)


def test_the_pipeline_decisions_are_the_same_with_nvimgcodec(pipeline, verification_images):
    """Through the configuration (FacePipelineConfig.jpeg_decoder, from face.jpeg_decoder): the
    detections, embeddings and refusals of the verification fixtures are those of OpenCV's path."""
    assert pipeline.jpeg_decoder == "opencv"  # auto on the CPU
    nv = FacePipeline(dataclasses.replace(pipeline.config, jpeg_decoder="nvimgcodec", providers=CPU))
    try:
        assert nv.jpeg_decoder == "nvimgcodec-cpu"
        jpegs = [p for p in verification_images if p.suffix.lower() in (".jpg", ".jpeg")]
        assert len(jpegs) >= 10
        for path in jpegs:
            data = path.read_bytes()
            a, b = pipeline.analyse(data), nv.analyse(data)
            assert a.issues == b.issues and a.n_faces == b.n_faces and a.image_shape == b.image_shape
            assert a.face is not None and b.face is not None
            assert np.array_equal(a.face.box, b.face.box) and np.array_equal(a.face.landmarks5, b.face.landmarks5)
            assert a.face.score == b.face.score
            assert a.embeddings.keys() == b.embeddings.keys()
            for k in a.embeddings:
                assert np.array_equal(a.embeddings[k], b.embeddings[k]), path.name
    finally:
        nv.close()
