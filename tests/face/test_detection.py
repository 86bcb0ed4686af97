import numpy as np
import pytest

from face_helpers import load_bgr
from services.face.detection import letterbox
from services.face.subject import SubjectIssue, SubjectPolicy, choose_subject


def test_letterbox_never_enlarges_and_pads():
    img = np.full((150, 150, 3), 200, np.uint8)
    lb = letterbox(img, (640, 640), pad_ratio=0.25)
    assert lb.scale == 1.0 and lb.offset == (38.0, 38.0)
    assert (lb.canvas[38:188, 38:188] == 200).all() and lb.canvas[0, 0].sum() == 0
    big = np.zeros((2000, 1000, 3), np.uint8)
    lb = letterbox(big, (640, 640), pad_ratio=0.25)
    assert lb.scale == pytest.approx(640 / 3000, rel=1e-2)  # rounded to whole pixels
    boxes, lms = lb.to_image(np.array([[lb.offset[0], lb.offset[1], 100, 100]], np.float32), np.zeros((1, 5, 2), np.float32))
    assert boxes[0, :2] == pytest.approx([0, 0], abs=1e-3)


@pytest.mark.parametrize("which", ["yunet", "scrfd"])
def test_every_tight_crop_detected(which, request, verification_images):
    """The 150x150 face crops (face fills the frame) are found, one face each, landmarks inside the face."""
    detector = request.getfixturevalue(which)
    crops = [p for p in verification_images if p.name.startswith("faceapi_")]
    assert len(crops) == 40
    for p in crops:
        faces = detector.detect(load_bgr(p))
        assert len(faces) == 1, p.name
        f = faces[0]
        assert f.size > 90, p.name
        lm = f.landmarks5
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0] and lm[:2, 1].max() < lm[3:, 1].min(), p.name  # eyes above mouth


@pytest.mark.parametrize("which", ["yunet", "scrfd"])
def test_every_verification_image_has_a_face(which, request, verification_images):
    detector = request.getfixturevalue(which)
    for p in verification_images:
        assert detector.detect(load_bgr(p)), p.name


@pytest.mark.parametrize("which", ["yunet", "scrfd"])
def test_no_face_in_a_blank_or_noise_image(which, request):
    detector = request.getfixturevalue(which)
    assert detector.detect(np.full((480, 640, 3), 127, np.uint8)) == []
    rng = np.random.default_rng(0)
    assert detector.detect(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) == []


def _two_faces(face_dir):
    a = load_bgr(face_dir / "bbt_penny" / "faceapi_penny1.png")
    b = load_bgr(face_dir / "bbt_raj" / "faceapi_raj1.png")
    return np.hstack([a, np.zeros((150, 60, 3), np.uint8), b])


def test_two_faces_of_similar_size_are_refused(yunet, face_dir):
    img = _two_faces(face_dir)
    faces = yunet.detect(img)
    assert len(faces) == 2
    choice = choose_subject(faces, img.shape)
    assert choice.issue is SubjectIssue.MULTIPLE_FACES and choice.n_faces == 2
    # a tenant may allow it: the larger / more central face is then the subject
    assert choose_subject(faces, img.shape, SubjectPolicy(second_face_ratio=1.5)).issue is None


def test_small_background_face_is_tolerated(yunet, face_dir):
    import cv2

    big = load_bgr(face_dir / "barack_obama" / "face_recognition_examples_obama.jpg")
    small = cv2.resize(load_bgr(face_dir / "bbt_raj" / "faceapi_raj1.png"), (90, 90))
    img = big.copy()
    img[-100:-10, 10:100] = small  # a small face in the lower-left corner
    faces = yunet.detect(img)
    assert len(faces) == 2
    choice = choose_subject(faces, img.shape)
    assert choice.issue is None and choice.face is not None and choice.face.size == max(f.size for f in faces)


def test_no_face_issue():
    assert choose_subject([], (100, 100, 3)).issue is SubjectIssue.NO_FACE


def test_batched_yunet_equals_batch_one(tmp_path, face_models, yunet, verification_images):
    """A YuNet copy with a symbolic batch (the store's onnx_batchable recipe) detects N images in one call."""
    import onnx

    from face_helpers import CPU
    from services.common.models.derivations import onnx_batchable
    from services.face.yunet import YuNetDetector

    src = face_models["yunet-2023mar"]
    outputs = [o.name for o in onnx.load(str(src)).graph.output]
    dst = tmp_path / "yunet_batch.onnx"
    onnx_batchable(src, dst, {"batch_dim": "N", "tensors": ["input", *outputs]})
    batched = YuNetDetector(dst, max_batch=4, providers=CPU)
    assert yunet.max_batch == 1 and batched.max_batch == 4
    images = [load_bgr(p) for p in verification_images[:6]]
    together = batched.detect_batch(images)  # two calls: 4 + 2
    for img, faces in zip(images, together, strict=True):
        alone = yunet.detect(img)
        assert len(faces) == len(alone)
        for a, b in zip(faces, alone, strict=True):
            assert np.abs(a.box - b.box).max() < 1e-3 and np.abs(a.landmarks5 - b.landmarks5).max() < 1e-3


def test_a_far_blurrier_second_face_is_no_rival(yunet, face_dir):
    """An out-of-focus second face of the same size (a background person, a blurred crowd) does not
    refuse the photo; the same face in focus does."""
    import cv2

    from services.face.align import align_face
    from services.face.quality import sharpness

    a = load_bgr(face_dir / "bbt_penny" / "faceapi_penny1.png")
    b = load_bgr(face_dir / "bbt_raj" / "faceapi_raj1.png")
    blurred = cv2.GaussianBlur(b, (0, 0), 3.0)
    for second, expected in ((b, SubjectIssue.MULTIPLE_FACES), (blurred, None)):
        img = np.hstack([a, np.zeros((150, 60, 3), np.uint8), second])
        faces = yunet.detect(img)
        assert len(faces) == 2

        def measure(f, img: np.ndarray = img) -> float:
            return sharpness(align_face(img, f))

        choice = choose_subject(faces, img.shape, SubjectPolicy(), measure)
        assert choice.issue is expected
        # Without the sharpness measure (or with the rule off) both are rivals by size.
        assert choose_subject(faces, img.shape).issue is SubjectIssue.MULTIPLE_FACES
        assert choose_subject(faces, img.shape, SubjectPolicy(rival_min_sharpness_ratio=0.0),
                              measure).issue is SubjectIssue.MULTIPLE_FACES


def test_a_reused_canvas_blob_holds_exactly_the_letterboxed_image(face_dir):
    """The detector's input is written into reused float32 canvases: each use must equal a fresh
    letterbox of its image (a smaller image after a larger one leaves nothing of the larger)."""
    from services.face.detection import CanvasBlob, CanvasPool

    big = load_bgr(face_dir / "barack_obama" / "face_recognition_examples_obama.jpg")
    small = load_bgr(face_dir / "bbt_raj" / "faceapi_raj1.png")
    pool = CanvasPool((640, 640))
    for img in (big, small, np.ascontiguousarray(big[:, ::-1]), small):
        with pool.take(1) as blob:
            at = blob.place(0, img, 0.25)
            fresh = letterbox(img, (640, 640), pad_ratio=0.25)
            assert (at.scale, at.offset) == (fresh.scale, fresh.offset)
            assert np.array_equal(blob.array[0], fresh.canvas.transpose(2, 0, 1).astype(np.float32))
    with pool.take(1) as again:
        assert again is blob  # one call at a time: one canvas, reused
    padded = CanvasBlob(2, (640, 640))
    padded.place(0, small, 0.25)
    padded.copy_item(1, 0)
    padded.place(0, big, 0.25)
    padded.place(1, small, 0.25)
    assert np.array_equal(padded.array[1], letterbox(small, (640, 640), 0.25).canvas.transpose(2, 0, 1).astype(np.float32))


def test_only_single_canvases_are_pooled():
    from services.face.detection import CanvasPool

    pool = CanvasPool((640, 640))
    with pool.take(4) as four:
        pass
    with pool.take(4) as again:
        assert again is not four  # an upright search's four turns are not held between calls
    with pool.take(1) as one, pool.take(1) as other:
        assert one is not other  # concurrent calls never share a canvas


@pytest.fixture(scope="module")
def yunet_dynamic(model_store, face_models):
    """The shipped detector: YuNet with symbolic batch, height and width (manifest yunet-2023mar-batch)."""
    from face_helpers import CPU
    from services.face.yunet import YuNetDetector

    return YuNetDetector(model_store.path("yunet-2023mar-batch"), providers=CPU)


def test_a_fitted_canvas_detects_what_the_full_canvas_does(yunet_dynamic, fixtures_dir, verification_images):
    """On the CPU the detector's canvas ends FIT_MARGIN pixels past the bordered image: every face,
    box, landmark and score must stay as on the full 640x640 canvas (a margin of 64 px moved
    landmarks by up to 8 px), for small probes, photos shrunk to fit, portrait and landscape."""
    identities = sorted((fixtures_dir / "face" / "identities").glob("*/*.jpg"))[::12]
    live = sorted((fixtures_dir / "face" / "pad").glob("*/*"))[::4]
    images = [load_bgr(p) for p in [*verification_images, *identities, *live]]
    images += [np.ascontiguousarray(images[0].transpose(1, 0, 2)), images[0][: images[0].shape[0] // 2]]
    fitted_smaller = 0
    for img in images:
        yunet_dynamic.fit_canvas = False
        full = yunet_dynamic.detect(img)
        yunet_dynamic.fit_canvas = True
        size = yunet_dynamic.canvas_size([img])
        fitted_smaller += size[0] * size[1] < 640 * 640
        fitted = yunet_dynamic.detect(img)
        assert len(fitted) == len(full), (img.shape, size)
        for a, b in zip(full, fitted, strict=True):
            assert np.abs(a.landmarks5 - b.landmarks5).max() < 0.01, (img.shape, size)
            assert np.abs(a.box - b.box).max() < 0.01 and abs(a.score - b.score) < 1e-4, (img.shape, size)
    yunet_dynamic.fit_canvas = False
    assert fitted_smaller >= len(images) // 2  # the comparison ran on canvases that were cut short


def test_the_fitted_canvas_is_the_full_one_cut_short(yunet_dynamic, face_dir):
    """The fitted canvas holds the image at the full canvas's scale and place, rounded up to the
    largest stride, never beyond the full canvas; a batch takes its largest image's."""
    from services.face.detection import CanvasPool

    small = load_bgr(face_dir / "bbt_raj" / "faceapi_raj1.png")  # 150 x 150
    big = load_bgr(face_dir / "barack_obama" / "face_recognition_examples_obama.jpg")
    yunet_dynamic.fit_canvas = True
    try:
        border = round(0.25 * 150)
        side = -(-(150 + 2 * border + 128) // 32) * 32
        assert yunet_dynamic.canvas_size([small]) == (side, side)
        assert yunet_dynamic.canvas_size([big]) == (640, 640)
        assert yunet_dynamic.canvas_size([small, big]) == (640, 640)
    finally:
        yunet_dynamic.fit_canvas = False
    pool = CanvasPool((640, 640))
    with pool.take(1, (side, side)) as blob:
        blob.place(0, small, 0.25)
        full = letterbox(small, (640, 640), 0.25).canvas.transpose(2, 0, 1).astype(np.float32)
        assert blob.array.shape == (1, 3, side, side)
        assert np.array_equal(blob.array[0], full[:, :side, :side]) and not full[:, side:, :].any()
    with pool.take(1, (side, side)) as again:
        assert again is not blob  # fitted canvases, of many sizes, are not held


def test_a_fixed_size_detector_file_cannot_fit_its_canvas(yunet):
    assert not yunet.can_fit_canvas
    with pytest.raises(ValueError, match="fixed input size"):
        yunet.fit_canvas = True


def test_the_fitted_canvas_holds_on_pictures_the_margin_was_not_chosen_on(yunet_dynamic):
    """FIT_MARGIN was chosen on the face fixtures; insightface's own sample group photo (not a fixture)
    cut into tight and loose crops of every face at probe sizes must detect alike on both canvases."""
    from pathlib import Path

    import cv2
    import insightface

    group = cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"))
    assert group is not None
    yunet_dynamic.fit_canvas = False
    faces = yunet_dynamic.detect(group)
    assert len(faces) >= 5
    probes = []
    for f in faces:
        x1, y1, x2, y2 = f.box
        for grow in (1.2, 1.8, 2.6):
            cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * grow / 2
            crop = group[max(0, int(cy - r)):int(cy + r), max(0, int(cx - r)):int(cx + r)]
            for side in (100, 180, 300):
                s = side / max(crop.shape[:2])
                probes.append(cv2.resize(crop, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR))
    try:
        for img in probes:
            yunet_dynamic.fit_canvas = False
            full = yunet_dynamic.detect(img)
            yunet_dynamic.fit_canvas = True
            assert yunet_dynamic.canvas_size([img]) != (640, 640)
            fitted = yunet_dynamic.detect(img)
            assert len(fitted) == len(full), img.shape
            for a, b in zip(full, fitted, strict=True):
                assert np.abs(a.landmarks5 - b.landmarks5).max() < 0.01 and abs(a.score - b.score) < 1e-4, img.shape
    finally:
        yunet_dynamic.fit_canvas = False
