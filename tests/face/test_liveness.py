import numpy as np
import pytest

from face_helpers import CPU, load_bgr
from services.face.detection import Face
from services.face.liveness import LivenessModelSpec, PassiveLiveness, crop_for_scale, retinaface_box


@pytest.fixture(scope="module")
def liveness(face_models):
    return PassiveLiveness(
        [LivenessModelSpec(face_models["minifasnet-v2-2.7"], 2.7), LivenessModelSpec(face_models["minifasnet-v1se-4.0"], 4.0)],
        providers=CPU,
    )


def _score(liveness, detector, path):
    img = load_bgr(path)
    return liveness.score(img, max(detector.detect(img), key=lambda f: f.size))


def test_live_and_spoof_fixtures_are_separated(liveness, yunet, fixtures_dir):
    pad = fixtures_dir / "face" / "pad"
    live = [_score(liveness, yunet, pad / "live" / f"apfol_real_{i}.png") for i in (0, 40, 80)]
    live.append(_score(liveness, yunet, pad / "live" / "silentface_image_T1.jpg"))
    spoof = [_score(liveness, yunet, pad / "spoof" / f"apfol_fake_{i}.png") for i in (0, 60, 120)]
    spoof += [_score(liveness, yunet, pad / "spoof" / f"silentface_image_F{i}.jpg") for i in (1, 2)]
    assert all(0.0 <= s <= 1.0 for s in live + spoof)
    assert min(live) > 0.53 > max(spoof), (live, spoof)  # 0.533: the EER threshold on pad_face.csv


def test_crop_is_clamped_inside_the_image():
    img = np.arange(100 * 60 * 3, dtype=np.uint32).reshape(100, 60, 3).astype(np.uint8)
    crop = crop_for_scale(img, np.array([40, 70, 70, 110], np.float32), 4.0)  # off the bottom-right
    assert crop.shape == (80, 80, 3)
    # scale 4 would exceed the image: it shrinks to what fits, and the box shifts inside
    small = crop_for_scale(img, np.array([20, 30, 40, 60], np.float32), 1.0)
    assert small.shape == (80, 80, 3)


def test_tight_photo_is_cropped_whole_never_padded():
    """Silent-Face's CropImage: a scale that does not fit shrinks to what does and the box shifts
    inside the image. On a tight photo (a 176 px news crop, the face box half of it, off centre)
    both models get the whole photo resized, with no border added: a black border is what a screen
    or print frame looks like to these models."""
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(40, 216, (176, 176, 3), dtype=np.uint8)
    whole = cv2.resize(img, (80, 80))
    for box in ([44, 47, 143, 146], [10, 60, 100, 150]):
        for scale in (2.7, 4.0):
            crop = crop_for_scale(img, np.array(box, np.float32), scale)
            assert np.array_equal(crop, whole), (box, scale)


def test_landmark_box_is_detector_independent(yunet, scrfd, fixtures_dir):
    img = load_bgr(fixtures_dir / "face" / "verification" / "barack_obama" / "face_recognition_examples_obama.jpg")
    a = retinaface_box(max(yunet.detect(img), key=lambda f: f.size))
    b = retinaface_box(max(scrfd.detect(img), key=lambda f: f.size))
    side = a[2] - a[0]
    assert abs((a[3] - a[1]) - side) < 1e-3  # square
    assert np.abs(a - b).max() < 0.08 * side  # same box from either detector's landmarks


def test_batch_scores_equal_single_scores(liveness, yunet, fixtures_dir):
    pad = fixtures_dir / "face" / "pad"
    items = []
    for p in [pad / "live" / "apfol_real_0.png", pad / "spoof" / "apfol_fake_0.png"]:
        img = load_bgr(p)
        items.append((img, max(yunet.detect(img), key=lambda f: f.size)))
    batch = liveness.score_crops([liveness.crops(i, f) for i, f in items])
    single = [liveness.score(i, f) for i, f in items]
    assert np.allclose(batch, single, atol=1e-5)


def test_rotated_face_box_keeps_its_size():
    lm = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]], np.float32)
    c = lm.mean(axis=0)
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)
    upright = retinaface_box(Face(np.zeros(4, np.float32), lm, 1.0))
    rolled = retinaface_box(Face(np.zeros(4, np.float32), (lm - c) @ rot.T + c, 1.0))
    assert (rolled[2] - rolled[0]) == pytest.approx(upright[2] - upright[0], rel=1e-3)
