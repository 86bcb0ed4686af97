"""YuNet (OpenCV Zoo, 2023mar) face detector on onnxruntime, so that the CUDA provider can run it.

The file has a fixed 1x3x640x640 input (BGR, raw 0..255). Decoding follows OpenCV's
``FaceDetectorYN``: per stride, score = sqrt(cls * obj), box centre offset and log size in units
of the stride, landmarks as offsets from the anchor cell.
"""

from __future__ import annotations

import os

import numpy as np

from services.common.inference import DEFAULT_PROVIDERS, create_session
from services.face.detection import Face, letterbox, nms, to_faces

STRIDES = (8, 16, 32)


class YuNetDetector:
    def __init__(
        self,
        model_path: str | os.PathLike[str],
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        pad_ratio: float = 0.25,
        providers=DEFAULT_PROVIDERS,
    ) -> None:
        self.model = create_session(model_path, providers)
        self.provider = self.model.provider
        shape = self.model.session.get_inputs()[0].shape
        self.input_size = (int(shape[3]), int(shape[2]))  # (w, h)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.pad_ratio = pad_ratio
        self._input = self.model.input_names[0]
        names = self.model.output_names
        self._outputs = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES]
        missing = set(self._outputs) - set(names)
        if missing:
            raise ValueError(f"{model_path}: not a YuNet model (missing outputs {sorted(missing)})")
        self._anchors = {
            s: np.stack(np.meshgrid(np.arange(self.input_size[0] // s), np.arange(self.input_size[1] // s)), -1)
            .reshape(-1, 2)
            .astype(np.float32)
            for s in STRIDES
        }

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        lb = letterbox(image_bgr, self.input_size, self.pad_ratio)
        blob = lb.canvas.transpose(2, 0, 1)[None].astype(np.float32)
        out = dict(zip(self._outputs, self.model.session.run(self._outputs, {self._input: blob})))
        boxes, kps, scores = [], [], []
        for s in STRIDES:
            anchors = self._anchors[s]
            score = np.sqrt(np.clip(out[f"cls_{s}"][0, :, 0], 0, 1) * np.clip(out[f"obj_{s}"][0, :, 0], 0, 1))
            sel = score >= self.score_threshold
            if not sel.any():
                continue
            a, bb, kp = anchors[sel], out[f"bbox_{s}"][0][sel], out[f"kps_{s}"][0][sel]
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
