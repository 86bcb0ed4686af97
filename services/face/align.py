"""Alignment: similarity transform of the 5 landmarks onto the ArcFace 112x112 template.

The transform is the least-squares similarity (rotation, uniform scale, translation; no
reflection) of Umeyama 1991, the estimate insightface's ``norm_crop`` gets from scikit-image's
``SimilarityTransform.estimate``. In two dimensions it has a closed form: with the centred points,
``A = dst_c.T @ src_c / n``, the rotation angle is ``atan2(A[1,0] - A[0,1], A[0,0] + A[1,1])`` and
``scale * cos``, ``scale * sin`` are ``A[0,0] + A[1,1]`` and ``A[1,0] - A[0,1]`` over the source's
variance (the SVD's singular values summed with the reflection sign = that hypotenuse). Computed
here with numpy's dtypes as scikit-image computes it (float32 landmarks: their mean and variance in
float32), it costs ~15 us instead of ~85 us, and the crops are those of ``norm_crop``
(bench/face_align_check.py compares both on every fixture face).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from insightface.utils.face_align import arcface_dst

from services.face.detection import Face

ALIGNED_SIZE = 112
_TEMPLATE = np.asarray(arcface_dst, np.float64)


def _template(size: int) -> np.ndarray:
    """The ArcFace landmark template for a ``size`` crop (insightface's ``estimate_norm``)."""
    if size % 112 == 0:
        return _TEMPLATE * (float(size) / 112.0)
    if size % 128 == 0:
        ratio = float(size) / 128.0
        dst = _TEMPLATE * ratio
        dst[:, 0] += 8.0 * ratio
        return dst
    raise ValueError(f"aligned size must be a multiple of 112 or 128, not {size}")


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity taking ``src`` points [N, 2] onto ``dst`` [N, 2]."""
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    a = dst_c.T @ src_c / src.shape[0]
    var = src_c.var(axis=0).sum()
    if not var > 0:
        raise ValueError("degenerate landmarks: all points coincide")
    p = (a[0, 0] + a[1, 1]) / var
    q = (a[1, 0] - a[0, 1]) / var
    m = np.empty((2, 3), np.float64)
    m[0, 0], m[0, 1] = p, -q
    m[1, 0], m[1, 1] = q, p
    m[:, 2] = dst_mean - m[:, :2] @ src_mean
    return m


def align_matrix(landmarks5: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The 2x3 warp of an image onto the ``size`` x ``size`` ArcFace crop of these 5 landmarks."""
    return similarity_matrix(np.asarray(landmarks5, np.float32), _template(size))


def align_face(image_bgr: np.ndarray, face: Face, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The aligned ``size`` x ``size`` BGR crop of ``face`` (every recogniser here takes this crop)."""
    return cv2.warpAffine(image_bgr, align_matrix(face.landmarks5, size), (size, size), borderValue=0.0)


def align_faces(image_bgr: np.ndarray, faces: Sequence[Face], size: int = ALIGNED_SIZE) -> np.ndarray:
    """Aligned crops as one uint8 batch [N, size, size, 3] (BGR)."""
    if not faces:
        return np.empty((0, size, size, 3), np.uint8)
    return np.stack([align_face(image_bgr, f, size) for f in faces])
