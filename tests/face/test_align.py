"""The closed-form similarity of services/face/align.py against scikit-image's estimate (insightface's
norm_crop) and against transforms known exactly."""

import math
import warnings

import numpy as np
import pytest
from insightface.utils.face_align import arcface_dst, estimate_norm, norm_crop

from face_helpers import load_bgr
from services.face.align import align_face, align_matrix, similarity_matrix

warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)


@pytest.mark.parametrize("angle,scale,shift", [(0.0, 1.0, (0.0, 0.0)), (0.3, 2.5, (40.0, -7.0)),
                                               (-2.9, 0.4, (300.5, 120.25)), (math.pi / 2, 1.7, (-5.0, 9.0))])
def test_a_known_similarity_is_recovered(angle, scale, shift):
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    truth = np.array([[c, -s, shift[0]], [s, c, shift[1]]])
    src = np.array(arcface_dst, np.float64) * 3.1 + 17.0
    dst = src @ truth[:, :2].T + truth[:, 2]
    assert np.abs(similarity_matrix(src, dst) - truth).max() < 1e-9


def test_a_mirrored_face_gets_no_reflection():
    src = np.array(arcface_dst, np.float64)
    mirrored = src * np.array([-1.0, 1.0]) + np.array([200.0, 0.0])
    m = align_matrix(mirrored.astype(np.float32))
    assert np.linalg.det(m[:, :2]) > 0  # a rotation and a scale, as scikit-image's estimate gives
    assert np.abs(m - estimate_norm(mirrored.astype(np.float32))).max() < 1e-4


def test_coincident_landmarks_refused():
    with pytest.raises(ValueError):
        align_matrix(np.full((5, 2), 50.0, np.float32))


def test_the_same_warp_as_norm_crop_on_fixture_faces(yunet, face_dir):
    paths = sorted(face_dir.rglob("*.jpg"))[:12] + sorted(face_dir.rglob("*.png"))[:12]
    n = 0
    for path in paths:
        img = load_bgr(path)
        for face in yunet.detect(img):
            lm = face.landmarks5.astype(np.float32)
            # scikit-image estimates in float32 for float32 landmarks; this in float64 (~1e-5 apart)
            assert np.abs(align_matrix(lm) - estimate_norm(lm)).max() < 1e-3
            diff = np.abs(align_face(img, face).astype(int) - norm_crop(img, lm).astype(int))
            assert diff.max() <= 1 and np.count_nonzero(diff) < 0.01 * diff.size
            n += 1
    assert n >= 20
