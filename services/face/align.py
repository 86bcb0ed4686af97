"""Alignment: similarity transform of the 5 landmarks onto the ArcFace 112x112 template."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from insightface.utils.face_align import norm_crop

from services.face.detection import Face

ALIGNED_SIZE = 112

# norm_crop calls scikit-image's deprecated SimilarityTransform.estimate (same result); one
# warning per aligned face would flood the logs.
warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)


def align_face(image_bgr: np.ndarray, face: Face, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The aligned ``size`` x ``size`` BGR crop of ``face`` (every recogniser here takes this crop)."""
    return norm_crop(image_bgr, face.landmarks5.astype(np.float32), image_size=size)


def align_faces(image_bgr: np.ndarray, faces: Sequence[Face], size: int = ALIGNED_SIZE) -> np.ndarray:
    """Aligned crops as one uint8 batch [N, size, size, 3] (BGR)."""
    if not faces:
        return np.empty((0, size, size, 3), np.uint8)
    return np.stack([align_face(image_bgr, f, size) for f in faces])
