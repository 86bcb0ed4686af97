import threading

import numpy as np
import pytest

from face_helpers import CPU
from services.face.imaging import DecodeErrorCode, ImageDecodeError, decode_image
from services.face.batching import Inline, MicroBatcher
from services.face.pipeline import FacePipeline, LivenessUnavailable
from tests.conftest import present


def test_every_verification_image_is_enrolled(pipeline, verification_images):
    for p in verification_images:
        r = pipeline.analyse(p.read_bytes())
        assert r.accepted, (p.name, r.issues)
        assert set(r.embeddings) == {e.name for e in pipeline.config.embedders}
        for e in r.embeddings.values():
            assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-5


def test_refusals_are_reported_not_embedded(pipeline, face_dir):
    import cv2

    from face_helpers import load_bgr, two_faces

    blank = cv2.imencode(".png", np.full((200, 200, 3), 90, np.uint8))[1].tobytes()
    r = pipeline.analyse(blank)
    assert r.issues == ("NO_FACE",) and r.face is None and r.embeddings == {}
    a = load_bgr(face_dir / "bbt_penny" / "faceapi_penny1.png")
    two = cv2.imencode(".png", two_faces(face_dir))[1].tobytes()
    r = pipeline.analyse(two)
    assert "MULTIPLE_FACES" in r.issues and r.n_faces == 2 and r.embeddings == {}
    dark = cv2.imencode(".png", (a * 0.1).astype(np.uint8))[1].tobytes()
    r = pipeline.analyse(dark)
    assert "UNDER_EXPOSED" in r.issues and r.embeddings == {}
    assert pipeline.analyse(dark, enforce_quality=False).embeddings  # embedded when asked, issues kept


def test_a_face_on_its_side_or_upside_down_is_turned_upright(pipeline, verification_images):
    """The detector fits an upright face's landmarks onto a turned face, so their geometry cannot show
    the turn; its confidence over the four views can (62 of 62 fixture images each way:
    bench/face_rotation.py). A subset here, each turned by 90, 180 and 270 degrees."""
    name = pipeline.config.embedders[0].name
    for path in verification_images[::8]:
        image = decode_image(path.read_bytes())
        ref = pipeline.analyse_image(image)
        assert pipeline.analyse_image(image, upright=True).rotation == 0
        for k in (1, 2, 3):
            a = pipeline.analyse_image(np.ascontiguousarray(np.rot90(image, k)), upright=True)
            assert (a.rotation + 90 * k) % 360 == 0, (path.name, 90 * k, a.rotation)
            assert float(np.dot(ref.embeddings[name], a.embeddings[name])) > 0.99


def test_bad_bytes_raise_a_typed_error(pipeline):
    for data, code in [(b"", DecodeErrorCode.EMPTY_IMAGE), (b"GIF89a....", DecodeErrorCode.UNSUPPORTED_FORMAT)]:
        with pytest.raises(ImageDecodeError) as err:
            pipeline.analyse(data)
        assert err.value.code is code


def test_liveness_on_request(pipeline, fixtures_dir):
    live = pipeline.analyse((fixtures_dir / "face/pad/live/apfol_real_10.png").read_bytes(), liveness=True, embed=False)
    spoof = pipeline.analyse((fixtures_dir / "face/pad/spoof/apfol_fake_60.png").read_bytes(), liveness=True, embed=False)
    assert live.liveness > 0.53 > spoof.liveness
    assert live.embeddings == {} and pipeline.analyse((fixtures_dir / "face/pad/live/apfol_real_10.png").read_bytes()).liveness is None


def test_no_liveness_model_refuses_liveness(model_store, face_models):
    from services.face.models import pipeline_config

    p = FacePipeline(pipeline_config(model_store, liveness=(), providers=CPU))
    try:
        with pytest.raises(LivenessUnavailable):
            p.analyse_image(np.zeros((100, 100, 3), np.uint8), liveness=True)
        assert "liveness" not in p.providers
    finally:
        p.close()


def test_providers_and_warmup(pipeline):
    pipeline.warmup()
    assert set(pipeline.providers) == {"detector", "embedder:mobilefacenet-arcface-192d", "liveness"}
    assert all(v.endswith("ExecutionProvider") for v in pipeline.providers.values())


def test_concurrent_requests_share_batches(pipeline, verification_images):
    data = [p.read_bytes() for p in verification_images[:16]]
    expected = [pipeline.analyse(d).embeddings for d in data]
    batcher = next(iter(pipeline._embed_batchers.values()))
    before = (batcher.batches, batcher.items)
    out: list = [None] * len(data)

    def work(i):
        out[i] = pipeline.analyse(data[i]).embeddings

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(expected, out, strict=True):
        for k in a:
            assert np.abs(a[k] - b[k]).max() < 1e-4
    assert batcher.items - before[1] == len(data)


def test_batched_detector_in_the_pipeline(tmp_path, model_store, face_models, pipeline, verification_images):
    import dataclasses

    import onnx

    from services.common.models.derivations import onnx_batchable

    src = face_models["yunet-2023mar"]
    dst = tmp_path / "yunet_batch.onnx"
    onnx_batchable(src, dst, {"batch_dim": "N", "tensors": ["input", *[o.name for o in onnx.load(str(src)).graph.output]]})
    cfg = pipeline.config
    p = FacePipeline(dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, path=dst), liveness=(),
                                         batching="on"))
    try:
        assert isinstance(p._detect_batcher, MicroBatcher)
        data = [x.read_bytes() for x in verification_images[:8]]
        out: list = [None] * len(data)
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, p.analyse(data[i]))) for i in range(len(data))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for d, r in zip(data, out, strict=True):
            ref = pipeline.analyse(d)
            assert np.abs(r.face.box - present(ref.face).box).max() < 1e-3
            for k in ref.embeddings:
                assert float(r.embeddings[k] @ ref.embeddings[k]) > 0.9999
        assert p._detect_batcher.items == len(data)
    finally:
        p.close()
    with pytest.raises(ValueError, match="detector_canvas 'fitted' needs a detector whose height and width"):
        FacePipeline(dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, path=dst), liveness=(),
                                         detector_canvas="fitted"))


def test_on_the_cpu_the_models_run_inline_with_the_batchers_results(pipeline, verification_images):
    import dataclasses

    assert not pipeline.batching and isinstance(pipeline._detect_batcher, Inline)  # "auto" on the CPU provider
    assert pipeline.detector.fit_canvas  # inline: each canvas fitted to its image
    batched = FacePipeline(dataclasses.replace(pipeline.config, batching="on"))
    try:
        assert batched.batching and isinstance(batched._detect_batcher, MicroBatcher)
        assert not batched.detector.fit_canvas  # batches keep the full canvas
        data = [x.read_bytes() for x in verification_images[:6]]
        out: list = [None] * len(data)
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, pipeline.analyse(data[i], liveness=True)))
                   for i in range(len(data))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for d, r in zip(data, out, strict=True):
            ref = batched.analyse(d, liveness=True)
            assert r.issues == ref.issues and np.abs(r.face.box - present(ref.face).box).max() < 1e-3
            assert r.liveness is not None and ref.liveness is not None and abs(r.liveness - ref.liveness) < 1e-4
            for k in ref.embeddings:
                assert float(r.embeddings[k] @ ref.embeddings[k]) > 0.9999
    finally:
        batched.close()
