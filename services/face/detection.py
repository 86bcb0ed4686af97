"""The face detector interface, shared by every detector module (yunet, scrfd).

A detector takes a BGR image of any size and returns faces in that image's pixel coordinates.
Both detectors here see the image through :func:`letterbox`: large images are shrunk to fit the
network input, small ones are never enlarged (upscaling a 150x150 tight crop to 640 made the
detectors miss the face), and a border of ``pad_ratio`` is added around the image so that a face
filling the whole frame still has the context the detector was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np


@dataclass(frozen=True)
class Face:
    box: np.ndarray  # float32 [4]: x1, y1, x2, y2
    landmarks5: np.ndarray  # float32 [5, 2]: right eye, left eye, nose, right mouth, left mouth (image left to right)
    score: float

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def size(self) -> float:
        """Side of the square with the box's area, the detector-independent face size."""
        return float(np.sqrt(max(self.width, 0.0) * max(self.height, 0.0)))


class Detector(Protocol):
    provider: str

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        """Faces found in ``image_bgr``, best score first."""
        ...


@dataclass(frozen=True)
class Letterbox:
    """Where the image went on the canvas: canvas = image * scale + offset."""

    canvas: np.ndarray
    scale: float
    offset: tuple[float, float]

    def to_image(self, boxes: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ox, oy = self.offset
        boxes = (boxes - np.array([ox, oy, ox, oy], np.float32)) / self.scale
        landmarks = (landmarks - np.array([ox, oy], np.float32)) / self.scale
        return boxes.astype(np.float32), landmarks.astype(np.float32)


def letterbox(
    image_bgr: np.ndarray, size: tuple[int, int], pad_ratio: float, fill: int = 0
) -> Letterbox:
    """Place the image, with a border of ``pad_ratio`` x its longer side, on a ``size`` (w, h) canvas.

    The padded image is shrunk to fit when it is larger than the canvas and never enlarged.
    """
    h, w = image_bgr.shape[:2]
    border = int(round(pad_ratio * max(h, w)))
    scale = min(1.0, size[0] / (w + 2 * border), size[1] / (h + 2 * border))
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    pb = int(round(border * scale))
    canvas = np.full((size[1], size[0], 3), fill, dtype=np.uint8)
    resized = image_bgr if scale == 1.0 else cv2.resize(image_bgr, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas[pb : pb + nh, pb : pb + nw] = resized
    return Letterbox(canvas=canvas, scale=nw / w, offset=(float(pb), float(pb)))


def nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float) -> np.ndarray:
    """Indices kept by non-maximum suppression, best score first."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    xywh = np.column_stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), score_threshold, iou_threshold)
    keep = np.asarray(kept, dtype=np.int64).reshape(-1)
    return keep[np.argsort(-scores[keep], kind="stable")]


def to_faces(boxes: np.ndarray, landmarks: np.ndarray, scores: np.ndarray, lb: Letterbox) -> list[Face]:
    """Canvas detections back to image coordinates (not clipped: a face may run off the frame)."""
    boxes, landmarks = lb.to_image(boxes, landmarks.reshape(-1, 5, 2))
    return [Face(box=b, landmarks5=k.reshape(5, 2), score=float(s)) for b, k, s in zip(boxes, landmarks, scores)]
