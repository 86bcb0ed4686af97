"""YuNet (OpenCV Zoo, 2023mar) face detector on onnxruntime, so that the CUDA provider can run it.

The file has a fixed 1x3x640x640 input (BGR, raw 0..255). Every image is letterboxed onto that
fixed canvas, so requests can share one batched call: a copy whose dim 0 of the input and the
outputs is symbolic (the model store's ``onnx_batchable`` recipe) runs N canvases at once; its
final Reshape keeps a literal 1, so each output comes back as [1, N*A, C] in batch-major order
and is reshaped to [N, A, C] (identical to N batch-1 runs). Decoding follows OpenCV's
``FaceDetectorYN``: per stride, score = sqrt(cls * obj), box centre offset and log size in units
of the stride, landmarks as offsets from the anchor cell.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from services.common.inference import DEFAULT_PROVIDERS, create_session
from services.face.detection import CanvasPool, Face, Placement, nms, to_faces

STRIDES = (8, 16, 32)


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
    ) -> None:
        self.model = create_session(model_path, providers, threads)
        self.provider = self.model.provider
        shape = self.model.session.get_inputs()[0].shape
        self.input_size = (int(shape[3]), int(shape[2]))  # (w, h)
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
        self._anchors = {
            s: np.stack(np.meshgrid(np.arange(self.input_size[0] // s), np.arange(self.input_size[1] // s)), -1)
            .reshape(-1, 2)
            .astype(np.float32)
            for s in STRIDES
        }
        self._canvases = CanvasPool(self.input_size)

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        return self.detect_batch([image_bgr])[0]

    def detect_batch(self, images_bgr: list[np.ndarray]) -> list[list[Face]]:
        """Faces of each image; one network call per ``max_batch`` images."""
        out: list[list[Face]] = []
        for i in range(0, len(images_bgr), self.max_batch):
            chunk = images_bgr[i : i + self.max_batch]
            n = self.model.bucket(len(chunk))
            with self._canvases.take(n) as blob:
                places = [blob.place(j, img, self.pad_ratio) for j, img in enumerate(chunk)]
                for j in range(len(chunk), n):  # a padded bucket repeats the first canvas
                    blob.copy_item(j, 0)
                raw = self.model.session.run(self._outputs, {self._input: blob.array})  # outputs [1, N * anchors, C]
            per = {name: r.reshape(n, -1, r.shape[-1])[: len(chunk)] for name, r in zip(self._outputs, raw)}
            out.extend(self._decode({k: v[j] for k, v in per.items()}, at) for j, at in enumerate(places))
        return out

    def _decode(self, out: dict[str, np.ndarray], lb: Placement) -> list[Face]:
        boxes, kps, scores = [], [], []
        for s in STRIDES:
            anchors = self._anchors[s]
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
