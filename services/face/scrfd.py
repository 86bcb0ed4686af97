"""SCRFD face detector (InsightFace; buffalo_s/m packs' det_*.onnx) through insightface's SCRFD class.

insightface's own ``detect`` always resizes the image to the network input, enlarging small ones;
here the image is letterboxed with :func:`services.face.detection.letterbox` instead (never
enlarged, padded) and only SCRFD's ``forward`` (network + anchor decoding) is used.
"""

from __future__ import annotations

import os

import numpy as np
from insightface.model_zoo.scrfd import SCRFD

from services.common.inference import DEFAULT_PROVIDERS, create_session
from services.face.detection import Face, letterbox, nms, to_faces


class ScrfdDetector:
    can_fit_canvas = False  # insightface's SCRFD letterboxes to its input size
    fit_canvas = False

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        pad_ratio: float = 0.25,
        input_size: tuple[int, int] = (640, 640),
        providers=DEFAULT_PROVIDERS,
        threads: int | None = None,
    ) -> None:
        self.model = create_session(model_path, providers, threads)
        self.provider = self.model.provider
        # One dynamic-shape session for every input size (no per-size session copies).
        self._scrfd = SCRFD(model_file=str(model_path), session=self.model.session, static_shape_sessions=False)
        if not self._scrfd.use_kps:
            raise ValueError(f"{model_path}: this SCRFD model has no landmark head")
        fixed = self._scrfd.static_input_size
        self.input_size = tuple(fixed) if fixed else input_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.pad_ratio = pad_ratio

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        lb = letterbox(image_bgr, self.input_size, self.pad_ratio)
        scores, boxes, kps = self._scrfd.forward(lb.canvas, self.score_threshold)
        if sum(len(s) for s in scores) == 0:
            return []
        sc = np.vstack(scores).ravel()
        b, k = np.vstack(boxes), np.vstack(kps).reshape(-1, 10)
        keep = nms(b, sc, self.score_threshold, self.nms_threshold)
        return to_faces(b[keep], k[keep], sc[keep], lb)
