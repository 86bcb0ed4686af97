"""Passive liveness: MiniFASNetV2 (crop scale 2.7) + MiniFASNetV1SE (scale 4.0), Silent-Face ensemble.

Preprocessing (Silent-Face-Anti-Spoofing's ``CropImage``): enlarge the face box about its centre
by the model's scale (less when the enlarged box would exceed the image), shift it inside the
image, crop, resize to 80x80, BGR raw 0..255 floats, NCHW. Output: 3 logits, softmax, class 1 is
live. The score is the mean live probability of the models.

The models are very sensitive to the box geometry: they were trained on the boxes of a
WIDER FACE RetinaFace. :func:`retinaface_box` derives such a box from the 5 landmarks alone (a
fixed box in the ArcFace template frame, mapped through the landmarks' similarity transform), so
that any detector gives the crop the models expect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from insightface.utils.face_align import arcface_dst

from services.common.inference import DEFAULT_PROVIDERS, create_session
from services.face.detection import Face

CROP_SIZE = 80
# The box (x1, y1, x2, y2) in the 112x112 ArcFace template frame: centred where the median SCRFD
# box of the verification fixtures lies in that frame, square with that box's width (79 px).
# Measured on pad_face.csv (bench/face_eval_dev.py): the SCRFD-shaped box (h/w 1.24) gave 13 % EER,
# the square one 1.9 % (YuNet landmarks) / 3.2 % (SCRFD); the detectors' own boxes 15.7 % / 16.7 %.
TEMPLATE_BOX = (17.6, 30.85, 96.6, 109.85)


@dataclass(frozen=True)
class LivenessModelSpec:
    path: str | os.PathLike[str]
    scale: float  # 2.7 for MiniFASNetV2, 4.0 for MiniFASNetV1SE


def retinaface_box(face: Face, template_box: Sequence[float] = TEMPLATE_BOX) -> np.ndarray:
    """Axis-aligned box around ``template_box`` mapped from the template frame onto the image."""
    # Not align.similarity_matrix (least squares, image -> template): this box follows the
    # reference crop, a robust (LMEDS) fit from the template onto the image, and the threshold was
    # calibrated on it.
    m, _ = cv2.estimateAffinePartial2D(arcface_dst, face.landmarks5.astype(np.float32), method=cv2.LMEDS)
    if m is None:
        return face.box.astype(np.float32)
    x1, y1, x2, y2 = template_box
    corners = np.array([[x1, y1, 1], [x2, y1, 1], [x2, y2, 1], [x1, y2, 1]], np.float32) @ m.T
    # Keep the box's size under rotation: the mapped box's centre, with width/height scaled by |m|.
    s = float(np.hypot(m[0, 0], m[1, 0]))
    cx, cy = corners.mean(axis=0)
    hw, hh = (x2 - x1) * s / 2, (y2 - y1) * s / 2
    return np.array([cx - hw, cy - hh, cx + hw, cy + hh], np.float32)


def crop_for_scale(image_bgr: np.ndarray, box: np.ndarray, scale: float, size: int = CROP_SIZE) -> np.ndarray:
    """Silent-Face's crop: the box enlarged by ``scale`` (clamped to the image), resized to size x size."""
    src_h, src_w = image_bgr.shape[:2]
    x, y = float(box[0]), float(box[1])
    bw, bh = max(float(box[2] - box[0]), 1.0), max(float(box[3] - box[1]), 1.0)
    scale = min((src_h - 1) / bh, (src_w - 1) / bw, scale)
    nw, nh = bw * scale, bh * scale
    cx, cy = x + bw / 2, y + bh / 2
    x1, y1, x2, y2 = cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2
    if x1 < 0:
        x2, x1 = x2 - x1, 0.0
    if y1 < 0:
        y2, y1 = y2 - y1, 0.0
    if x2 > src_w - 1:
        x1, x2 = x1 - (x2 - src_w + 1), src_w - 1.0
    if y2 > src_h - 1:
        y1, y2 = y1 - (y2 - src_h + 1), src_h - 1.0
    x1, y1, x2, y2 = int(max(x1, 0)), int(max(y1, 0)), int(x2), int(y2)
    return cv2.resize(image_bgr[y1 : y2 + 1, x1 : x2 + 1], (size, size))


def _softmax_live(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e[:, 1] / e.sum(axis=1)).astype(np.float32)


class PassiveLiveness:
    """Mean live probability of the MiniFASNet models for (image, face) pairs."""

    def __init__(
        self,
        models: Sequence[LivenessModelSpec],
        box_source: str = "landmarks",  # "landmarks": retinaface_box(); "detector": the detector's box
        max_batch: int = 64,
        providers=DEFAULT_PROVIDERS,
        threads: int | None = None,
    ) -> None:
        if not models:
            raise ValueError("no liveness model configured")
        if box_source not in ("landmarks", "detector"):
            raise ValueError(f"box_source must be 'landmarks' or 'detector', not {box_source!r}")
        self.specs = list(models)
        self.models = [create_session(s.path, providers, threads) for s in self.specs]
        self.provider = self.models[0].provider
        self.box_source = box_source
        self.max_batch = max_batch

    def box_for(self, face: Face) -> np.ndarray:
        return retinaface_box(face) if self.box_source == "landmarks" else face.box

    def crops(self, image_bgr: np.ndarray, face: Face) -> list[np.ndarray]:
        """One 80x80 BGR crop per model (the unit the micro-batcher queues)."""
        box = self.box_for(face)
        return [crop_for_scale(image_bgr, box, s.scale) for s in self.specs]

    def score_crops(self, crops: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """Mean live probability for each item's per-model crops -> float32 [N]."""
        if not crops:
            return np.empty(0, np.float32)
        probs = []
        for m, model in enumerate(self.models):
            blob = np.stack([c[m] for c in crops]).transpose(0, 3, 1, 2).astype(np.float32)
            name = model.input_names[0]
            logits = np.concatenate(
                [model.run(None, {name: blob[i : i + self.max_batch]})[0] for i in range(0, len(blob), self.max_batch)]
            )
            probs.append(_softmax_live(logits))
        return np.mean(probs, axis=0).astype(np.float32)

    def score(self, image_bgr: np.ndarray, face: Face) -> float:
        return float(self.score_crops([self.crops(image_bgr, face)])[0])
