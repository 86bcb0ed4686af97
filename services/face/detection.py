"""The face detector interface, shared by every detector module (yunet, scrfd).

A detector takes a BGR image of any size and returns faces in that image's pixel coordinates.
Both detectors here see the image through :func:`letterbox`: large images are shrunk to fit the
network input, small ones are never enlarged (upscaling a 150x150 tight crop to 640 made the
detectors miss the face), and a border of ``pad_ratio`` is added around the image so that a face
filling the whole frame still has the context the detector was trained with.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

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
    # Whether the model's height and width are symbolic, so that a call's canvas may end a margin past a
    # small image instead of at the full input size; ``fit_canvas`` turns that on (yunet.py).
    can_fit_canvas: bool
    fit_canvas: bool

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        """Faces found in ``image_bgr``, best score first."""
        ...


@dataclass(frozen=True)
class Placement:
    """Where an image goes on a detector canvas: canvas = image * scale + offset."""

    scale: float
    offset: tuple[float, float]

    def to_image(self, boxes: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ox, oy = self.offset
        boxes = (boxes - np.array([ox, oy, ox, oy], np.float32)) / self.scale
        landmarks = (landmarks - np.array([ox, oy], np.float32)) / self.scale
        return boxes.astype(np.float32), landmarks.astype(np.float32)


@dataclass(frozen=True)
class Letterbox(Placement):
    canvas: np.ndarray


def placed_size(shape: tuple[int, ...], size: tuple[int, int], pad_ratio: float) -> tuple[int, int, int]:
    """(w, h, border) of an image of ``shape`` as it goes on a ``size`` canvas: shrunk to fit with its
    border, never enlarged; the image's top left corner sits ``border`` pixels in on both axes."""
    h, w = shape[:2]
    border = int(round(pad_ratio * max(h, w)))
    scale = min(1.0, size[0] / (w + 2 * border), size[1] / (h + 2 * border))
    return max(1, int(round(w * scale))), max(1, int(round(h * scale))), int(round(border * scale))


def _place(image_bgr: np.ndarray, size: tuple[int, int], pad_ratio: float) -> tuple[np.ndarray, Placement]:
    """The image as it goes on the canvas and where."""
    nw, nh, pb = placed_size(image_bgr.shape, size, pad_ratio)
    h, w = image_bgr.shape[:2]
    resized = image_bgr if (nw, nh) == (w, h) else cv2.resize(image_bgr, (nw, nh), interpolation=cv2.INTER_AREA)
    return resized, Placement(scale=nw / w, offset=(float(pb), float(pb)))


def letterbox(
    image_bgr: np.ndarray, size: tuple[int, int], pad_ratio: float, fill: int = 0
) -> Letterbox:
    """Place the image, with a border of ``pad_ratio`` x its longer side, on a ``size`` (w, h) canvas.

    The padded image is shrunk to fit when it is larger than the canvas and never enlarged.
    """
    resized, at = _place(image_bgr, size, pad_ratio)
    canvas = np.full((size[1], size[0], 3), fill, dtype=np.uint8)
    pb, nh, nw = int(at.offset[0]), resized.shape[0], resized.shape[1]
    canvas[pb : pb + nh, pb : pb + nw] = resized
    return Letterbox(scale=at.scale, offset=at.offset, canvas=canvas)


class CanvasBlob:
    """A float32 [N, 3, h, w] network input of black canvases that is reused: placing an image
    writes only its own rectangle, and the next use blacks out only the rectangles written before.
    Building a fresh 640x640 canvas, then its float32 NCHW copy, cost ~1.4 ms CPU per small selfie,
    more than the rest of the detector's pre- and post-processing together."""

    def __init__(self, n: int, size: tuple[int, int], full: tuple[int, int] | None = None) -> None:
        self.array = np.zeros((n, 3, size[1], size[0]), np.float32)
        self.size = size
        self.full = full or size  # the canvas images are scaled for; ``size`` may end short of it
        self._dirty: list[tuple[int, int, int, int] | None] = [None] * n

    def place(self, j: int, image_bgr: np.ndarray, pad_ratio: float) -> Placement:
        """Item ``j`` becomes ``image_bgr`` letterboxed exactly as :func:`letterbox` does it."""
        self.clear(j)
        resized, at = _place(image_bgr, self.full, pad_ratio)
        pb, nh, nw = int(at.offset[0]), resized.shape[0], resized.shape[1]
        for c in range(3):
            self.array[j, c, pb : pb + nh, pb : pb + nw] = resized[:, :, c]
        self._dirty[j] = (pb, pb + nh, pb, pb + nw)
        return at

    def copy_item(self, dst: int, src: int) -> None:
        self.clear(dst)
        self.array[dst] = self.array[src]
        self._dirty[dst] = (0, self.size[1], 0, self.size[0])

    def clear(self, j: int) -> None:
        rect = self._dirty[j]
        if rect is not None:
            y0, y1, x0, x1 = rect
            self.array[j, :, y0:y1, x0:x1] = 0.0
            self._dirty[j] = None


class CanvasPool:
    """Reusable :class:`CanvasBlob`s, one taken per model call: as many are kept as calls ran at once
    (the admission slots on a CPU, or the analysis pool's threads for a request of many frames),
    and only for batches of up to ``max_pooled`` canvases: a request's one image. The four turns of
    an upright search (~20 MB), a GPU batcher's batches and canvases cut short of ``size`` (a fitted
    canvas: many sizes, each small) are built afresh, not held for good."""

    def __init__(self, size: tuple[int, int], max_pooled: int = 1) -> None:
        self.size = size
        self.max_pooled = max_pooled
        self._free: dict[int, list[CanvasBlob]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def take(self, n: int, size: tuple[int, int] | None = None) -> Iterator[CanvasBlob]:
        if n > self.max_pooled or (size is not None and size != self.size):
            yield CanvasBlob(n, size or self.size, self.size)
            return
        with self._lock:
            free = self._free.setdefault(n, [])
            blob = free.pop() if free else None
        blob = blob or CanvasBlob(n, self.size)
        try:
            yield blob
        finally:
            with self._lock:
                self._free[n].append(blob)


def nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float) -> np.ndarray:
    """Indices kept by non-maximum suppression, best score first."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    xywh = np.column_stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), score_threshold, iou_threshold)
    keep = np.asarray(kept, dtype=np.int64).reshape(-1)
    return keep[np.argsort(-scores[keep], kind="stable")]


def to_faces(boxes: np.ndarray, landmarks: np.ndarray, scores: np.ndarray, lb: Placement) -> list[Face]:
    """Canvas detections back to image coordinates (not clipped: a face may run off the frame)."""
    boxes, landmarks = lb.to_image(boxes, landmarks.reshape(-1, 5, 2))
    return [Face(box=b, landmarks5=k.reshape(5, 2), score=float(s)) for b, k, s in zip(boxes, landmarks, scores, strict=True)]
