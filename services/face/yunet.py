"""YuNet (OpenCV Zoo, 2023mar) face detector on onnxruntime, so that the CUDA provider can run it.

The file has a fixed 1x3x640x640 input (BGR, raw 0..255). Every image is letterboxed onto that
fixed canvas, so requests can share one batched call: a copy whose dim 0 of the input and the
outputs is symbolic (the model store's ``onnx_batchable`` recipe) runs N canvases at once; its
final Reshape keeps a literal 1, so each output comes back as [1, N*A, C] in batch-major order
and is reshaped to [N, A, C] (identical to N batch-1 runs).

The copy's height and width are symbolic too. With ``fit_canvas`` a call's canvas, at the same
scale and place as on 640x640, ends :data:`FIT_MARGIN` black pixels past the bordered image
(rounded up to the largest stride) instead of filling 640x640: a 176 px probe's detector run
costs about a third. Nearer than that margin the canvas's edge changes what the deep layers see
(64 px moved landmarks by up to 8 px on the fixtures; 128 px left all 797 face fixtures' detections
as on 640x640, within 0.002 px): tests/face/test_detection.py holds it. The micro-batched
(accelerator) path keeps one shape, so no run meets a new one. Decoding follows OpenCV's
``FaceDetectorYN``: per stride, score = sqrt(cls * obj), box centre offset and log size in units
of the stride, landmarks as offsets from the anchor cell.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from services.common.inference import DEFAULT_PROVIDERS, create_session
from services.face.detection import CanvasPool, Face, Placement, nms, placed_size, to_faces

STRIDES = (8, 16, 32)
FIT_MARGIN = 128


def _anchor_grid(size: tuple[int, int]) -> dict[int, np.ndarray]:
    w, h = size
    return {s: np.stack(np.meshgrid(np.arange(w // s), np.arange(h // s)), -1).reshape(-1, 2).astype(np.float32)
            for s in STRIDES}


class YuNetDetector:
    def __init__(
        self,
        model_path: str | os.PathLike[str],
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        pad_ratio: float = 0.25,
        max_batch: int = 32,
        providers=DEFAULT_PROVIDERS,
        threads: int | None = None,
        input_size: tuple[int, int] = (640, 640),
        fit_canvas: bool = False,
    ) -> None:
        self.model = create_session(model_path, providers, threads)
        self.provider = self.model.provider
        shape = self.model.session.get_inputs()[0].shape
        fixed = isinstance(shape[2], int) and isinstance(shape[3], int)
        self.input_size = (int(shape[3]), int(shape[2])) if fixed else input_size  # (w, h): the full canvas
        self.can_fit_canvas = not fixed
        self.fit_canvas = fit_canvas
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.pad_ratio = pad_ratio
        self._input = self.model.input_names[0]
        dim0 = self.model.session.get_inputs()[0].shape[0]
        self.max_batch = dim0 if isinstance(dim0, int) and dim0 > 0 else max_batch
        if self.max_batch > 1:
            # The batch copy still declares [1, A, C] outputs, so onnxruntime warns on every
            # batched run that the actual [1, N*A, C] differs; the shapes are right (see above).
            ort.set_default_logger_severity(3)
        names = self.model.output_names
        self._outputs = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES]
        missing = set(self._outputs) - set(names)
        if missing:
            raise ValueError(f"{model_path}: not a YuNet model (missing outputs {sorted(missing)})")
        self._anchors = {self.input_size: _anchor_grid(self.input_size)}
        self._canvases = CanvasPool(self.input_size)

    @property
    def fit_canvas(self) -> bool:
        return self._fit

    @fit_canvas.setter
    def fit_canvas(self, on: bool) -> None:
        if on and not self.can_fit_canvas:
            raise ValueError("this YuNet file has a fixed input size: its canvas cannot fit the image")
        self._fit = on

    def canvas_size(self, images_bgr: list[np.ndarray]) -> tuple[int, int]:
        """The canvas (w, h) one call runs these images on: the full one, or with ``fit_canvas`` the
        smallest that holds each bordered image, as placed on the full canvas, and ``FIT_MARGIN``."""
        if not self._fit:
            return self.input_size
        w = h = 0
        for img in images_bgr:
            nw, nh, border = placed_size(img.shape, self.input_size, self.pad_ratio)
            w, h = max(w, nw + 2 * border + FIT_MARGIN), max(h, nh + 2 * border + FIT_MARGIN)
        step = STRIDES[-1]
        return (min(self.input_size[0], -(-w // step) * step), min(self.input_size[1], -(-h // step) * step))

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        return self.detect_batch([image_bgr])[0]

    def detect_batch(self, images_bgr: list[np.ndarray]) -> list[list[Face]]:
        """Faces of each image; one network call per ``max_batch`` images."""
        out: list[list[Face]] = []
        for i in range(0, len(images_bgr), self.max_batch):
            chunk = images_bgr[i : i + self.max_batch]
            n = self.model.bucket(len(chunk))
            size = self.canvas_size(chunk)
            with self._canvases.take(n, size) as blob:
                places = [blob.place(j, img, self.pad_ratio) for j, img in enumerate(chunk)]
                for j in range(len(chunk), n):  # a padded bucket repeats the first canvas
                    blob.copy_item(j, 0)
                raw = self.model.session.run(self._outputs, {self._input: blob.array})  # outputs [1, N * anchors, C]
            per = {name: r.reshape(n, -1, r.shape[-1])[: len(chunk)] for name, r in zip(self._outputs, raw, strict=True)}
            grid = self._anchors.get(size)
            if grid is None:
                grid = self._anchors[size] = _anchor_grid(size)  # at most (640 / 32)^2 sizes
            out.extend(self._decode({k: v[j] for k, v in per.items()}, at, grid) for j, at in enumerate(places))
        return out

    def _decode(self, out: dict[str, np.ndarray], lb: Placement, grid: dict[int, np.ndarray]) -> list[Face]:
        boxes, kps, scores = [], [], []
        for s in STRIDES:
            anchors = grid[s]
            score = np.sqrt(np.clip(out[f"cls_{s}"][:, 0], 0, 1) * np.clip(out[f"obj_{s}"][:, 0], 0, 1))
            sel = score >= self.score_threshold
            if not sel.any():
                continue
            a, bb, kp = anchors[sel], out[f"bbox_{s}"][sel], out[f"kps_{s}"][sel]
            centre = (a + bb[:, :2]) * s
            wh = np.exp(bb[:, 2:]) * s
            boxes.append(np.hstack([centre - wh / 2, centre + wh / 2]))
            kps.append(((kp.reshape(-1, 5, 2) + a[:, None, :]) * s).reshape(-1, 10))
            scores.append(score[sel])
        if not boxes:
            return []
        b, k, sc = np.vstack(boxes), np.vstack(kps), np.concatenate(scores)
        keep = nms(b, sc, self.score_threshold, self.nms_threshold)
        return to_faces(b[keep], k[keep], sc[keep], lb)
