"""The face pipeline: decode -> detect -> choose the subject -> quality -> align -> embed (+ liveness).

Built from a plain frozen :class:`FacePipelineConfig` of architectures and file paths (the service
resolves model ids to them, services/face/models.py; the routers of services/face/zoo.py build each
architecture's model). Embedders, liveness models and a batchable detector run behind
:class:`MicroBatcher`s, so concurrent requests from the server's thread pool share one model call.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from services.common.inference import LoadedModel
from services.face.align import align_face
from services.face.batching import Inline, MicroBatcher
from services.face.detection import Detector, Face
from services.face.embedding import Embedder
from services.face.imaging import DecodeLimits, JpegDecoderChoice, decode_image, jpeg_decoder
from services.face.liveness import LivenessModelSpec, PassiveLiveness
from services.face.quality import QualityReport, QualityThresholds, assess, sharpness
from services.face.subject import SubjectPolicy, choose_subject
from services.face.zoo import DETECTORS, EMBEDDERS

PathLike = str | os.PathLike[str]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class DetectorConfig:
    architecture: str  # a face_detector architecture of services/face/zoo.py: yunet, scrfd
    path: PathLike
    score_threshold: float | None = None  # None: the detector's default (YuNet 0.6, SCRFD 0.5)
    pad_ratio: float = 0.25  # border added around the image before detection (tight crops)


@dataclass(frozen=True)
class EmbedderConfig:
    name: str  # the key of this embedder's embedding in the results, e.g. the model id
    architecture: str  # a face_embedder architecture of services/face/zoo.py: sface, arcface-onnx
    path: PathLike
    input_mean: float = 127.5  # arcface only (MobileFaceNet: 127.5 / 128; InsightFace packs: 127.5 / 127.5)
    input_std: float = 128.0


@dataclass(frozen=True)
class FacePipelineConfig:
    detector: DetectorConfig
    embedders: tuple[EmbedderConfig, ...]
    liveness: tuple[LivenessModelSpec, ...] = ()  # empty: no liveness model, liveness requests fail
    liveness_box: Literal["landmarks", "detector"] = "landmarks"
    quality: QualityThresholds = field(default_factory=QualityThresholds)
    subject: SubjectPolicy = field(default_factory=SubjectPolicy)
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    batch_max: int = 32
    batch_wait_ms: float = 1.0
    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    # Intra-op threads per onnxruntime session (None: onnxruntime's default, all cores). Several
    # sessions run at once on the batcher threads, so one or two each avoids oversubscription.
    threads: int | None = None
    # Micro-batchers in front of the models: "auto" where the detector runs on an accelerator; on
    # the CPU each request runs the models on its own thread (services.common.batching.Inline).
    batching: Literal["auto", "on", "off"] = "auto"
    # The detector's canvas: "fitted" ends each call's canvas a margin past its images (YuNet with
    # symbolic height and width; same detections, less work for small images), "full" is always the
    # model's 640x640; "auto" fits it where the models run inline, i.e. not micro-batched, so that an
    # accelerator's batches keep one shape.
    detector_canvas: Literal["auto", "full", "fitted"] = "auto"
    # The decoder of plain JPEGs' pixels (services/face/imaging.py, jpeg_decoder): "auto" is nvImageCodec's
    # nvJPEG where the detector runs on CUDA and the package loads, else OpenCV.
    jpeg_decoder: JpegDecoderChoice = "auto"


@dataclass(frozen=True)
class FaceAnalysis:
    image_shape: tuple[int, ...]
    n_faces: int
    face: Face | None
    quality: QualityReport | None
    issues: tuple[str, ...]  # machine-readable: NO_FACE, MULTIPLE_FACES and the QualityIssue values
    embeddings: dict[str, np.ndarray]  # embedder name -> L2-normalised float32 [D]; empty when refused
    liveness: float | None  # mean live probability; None when not requested or no face
    rotation: int = 0  # degrees (counter-clockwise) the image was turned to bring the face upright

    @property
    def accepted(self) -> bool:
        return not self.issues


class LivenessUnavailable(RuntimeError):
    """Liveness was requested but no liveness model is configured."""


def build_detector(cfg: DetectorConfig, providers: tuple[str, ...], threads: int | None = None) -> Detector:
    return DETECTORS.by_architecture(cfg.architecture)(cfg, providers=providers, threads=threads)


def build_embedder(cfg: EmbedderConfig, providers: tuple[str, ...], threads: int | None = None) -> Embedder:
    return EMBEDDERS.by_architecture(cfg.architecture)(cfg, providers=providers, threads=threads)


def _embed_crops(embedder: Embedder, crops: list[np.ndarray]) -> list[np.ndarray]:
    return list(embedder.embed(np.stack(crops)))


class FacePipeline:
    def __init__(self, config: FacePipelineConfig) -> None:
        if not config.embedders:
            raise ValueError("at least one embedder is required")
        names = [e.name for e in config.embedders]
        if len(set(names)) != len(names):
            raise ValueError(f"embedder names must be unique: {names}")
        self.config = config
        self.detector = build_detector(config.detector, config.providers, config.threads)
        self.batching = config.batching == "on" or (config.batching == "auto" and self.detector.provider != CPU)
        can_fit = self.detector.can_fit_canvas
        if config.detector_canvas == "fitted" or (config.detector_canvas == "auto" and not self.batching and can_fit):
            if not can_fit:
                raise ValueError("face.detector_canvas 'fitted' needs a detector whose height and width are "
                                 "symbolic (yunet-2023mar-batch)")
            self.detector.fit_canvas = True
        self._jpeg, self.jpeg_decoder = jpeg_decoder(config.jpeg_decoder, self.detector.provider == CUDA)
        # A detector with a batch dimension (YuNet's batchable copy) is micro-batched as well.
        self._detect_batcher: MicroBatcher | Inline | None = None
        detect_batch = getattr(self.detector, "detect_batch", None)
        detect_max_batch = getattr(self.detector, "max_batch", 1)
        if detect_batch is not None and detect_max_batch > 1:
            self._detect_batcher = self._batcher(detect_batch, min(config.batch_max, detect_max_batch), "detect")
        self.embedders: dict[str, Embedder] = {e.name: build_embedder(e, config.providers, config.threads) for e in config.embedders}
        self._embed_batchers = {
            name: self._batcher(functools.partial(_embed_crops, emb),
                                min(config.batch_max, emb.max_batch) if emb.max_batch > 1 else 1, f"embed-{name}")
            for name, emb in self.embedders.items()
        }
        self.liveness: PassiveLiveness | None = None
        self._liveness_batcher: MicroBatcher | Inline | None = None
        if config.liveness:
            live = self.liveness = PassiveLiveness(
                config.liveness, box_source=config.liveness_box, providers=config.providers, threads=config.threads
            )
            self._liveness_batcher = self._batcher(lambda items: list(live.score_crops(items)), config.batch_max,
                                                   "liveness")

    def _batcher(self, fn, max_batch: int, name: str) -> MicroBatcher | Inline:
        if not self.batching:
            return Inline(fn, max_batch=max_batch, name=name)
        return MicroBatcher(fn, max_batch=max_batch, max_wait_ms=self.config.batch_wait_ms if max_batch > 1 else 0.0,
                            name=name)

    @property
    def providers(self) -> dict[str, str]:
        """The onnxruntime provider actually running each model, for health details and logs."""
        out = {"detector": self.detector.provider}
        out.update({f"embedder:{n}": e.provider for n, e in self.embedders.items()})
        if self.liveness is not None:
            out["liveness"] = self.liveness.provider
        return out

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.config.decode, self._jpeg)

    def analyse(self, data: bytes, **options) -> FaceAnalysis:
        """Decode and analyse image bytes; raises :class:`ImageDecodeError` for bad bytes."""
        return self.analyse_image(self.decode(data), **options)

    def analyse_image(
        self,
        image_bgr: np.ndarray,
        *,
        liveness: bool = False,
        embed: bool = True,
        enforce_quality: bool = True,
        subject: SubjectPolicy | None = None,
        upright: bool = False,
    ) -> FaceAnalysis:
        """Detect, choose, assess and (unless refused, or ``embed`` is False) embed the subject face.

        With ``enforce_quality`` False a face that fails a quality gate is embedded anyway (its
        issues are still listed); a missing or ambiguous subject is never embedded. ``subject``
        overrides the configured subject policy (per-tenant two-face refusal). With ``upright``
        the image is first turned the way its face stands upright (:meth:`upright`)."""
        if liveness and (self._liveness_batcher is None or self.liveness is None):
            raise LivenessUnavailable("no liveness model is configured")
        rotation = 0
        if upright:
            image_bgr, rotation, faces = self.upright(image_bgr)
        else:
            faces = self._detect_batcher.submit(image_bgr) if self._detect_batcher else self.detector.detect(image_bgr)
        choice = choose_subject(faces, image_bgr.shape, subject or self.config.subject,
                                lambda f: sharpness(align_face(image_bgr, f)))
        if choice.face is None:
            issue = (choice.issue.value,) if choice.issue else ()
            return FaceAnalysis(image_bgr.shape, 0, None, None, issue, {}, None, rotation)
        face = choice.face
        aligned = align_face(image_bgr, face)
        quality = assess(image_bgr.shape, face, aligned, self.config.quality)
        issues = ([choice.issue.value] if choice.issue else []) + [i.value for i in quality.issues]
        live_future = None
        if liveness and self._liveness_batcher is not None and self.liveness is not None:
            live_future = self._liveness_batcher.submit_async(self.liveness.crops(image_bgr, face))
        embeddings: dict[str, np.ndarray] = {}
        if embed and not choice.issue and (not enforce_quality or quality.accepted):
            futures = {n: b.submit_async(aligned) for n, b in self._embed_batchers.items()}
            embeddings = {n: f.result() for n, f in futures.items()}
        live = float(live_future.result()) if live_future is not None else None
        return FaceAnalysis(image_bgr.shape, choice.n_faces, face, quality, tuple(issues), embeddings, live, rotation)

    def with_liveness(self, image_bgr: np.ndarray, analysis: FaceAnalysis) -> FaceAnalysis:
        """``analysis`` (of ``image_bgr``, before any turn) with the live probability of its face: for
        a caller that chooses among several analyses of one image, so that only the chosen one is
        scored (one liveness inference per face and request)."""
        if self._liveness_batcher is None or self.liveness is None:
            raise LivenessUnavailable("no liveness model is configured")
        if analysis.face is None:
            return analysis
        view = np.ascontiguousarray(np.rot90(image_bgr, analysis.rotation // 90)) if analysis.rotation else image_bgr
        live = float(self._liveness_batcher.submit(self.liveness.crops(view, analysis.face)))
        return dataclasses.replace(analysis, liveness=live)

    def upright(self, image_bgr: np.ndarray) -> tuple[np.ndarray, int, list[Face]]:
        """(the image turned by 0, 90, 180 or 270 degrees so that its face stands upright, the
        degrees, the faces found in it). The detector is asked about all four views in one batch
        and the view with the most confident face wins: on a face on its side or upside down, the
        detector's landmarks still take an upright face's shape (eyes above the mouth), so their
        geometry cannot tell; its confidence can (upright won on every fixture image, 62 of 62,
        each turned by 90, 180 and 270 degrees: bench/face_rotation.py)."""
        views = [np.ascontiguousarray(np.rot90(image_bgr, k)) for k in range(4)]
        found = (self._detect_batcher.submit_many(views) if self._detect_batcher
                 else [self.detector.detect(v) for v in views])
        best = max(range(4), key=lambda k: max((f.score for f in found[k]), default=0.0))
        return views[best], 90 * best, found[best]

    def warmup(self) -> None:
        """Run every model at every batch size it will run at, on the batcher threads that will run
        it: on CUDA each new shape costs up to seconds once per thread (onnxruntime keeps cuDNN
        state per thread); on the CPU one call of each is enough."""
        img = np.full((256, 256, 3), 128, np.uint8)
        if self._detect_batcher is None:
            self.detector.detect(img)
        else:
            for b in _batch_sizes(self.detector, self._detect_batcher):
                self._detect_batcher.submit_many([img] * b)
        crop = np.full((112, 112, 3), 128, np.uint8)
        for name, emb in self.embedders.items():
            for b in _batch_sizes(emb, self._embed_batchers[name]):
                self._embed_batchers[name].submit_many([crop] * b)
        if self.liveness is not None and self._liveness_batcher is not None:
            face = Face(
                box=np.array([64, 64, 192, 192], np.float32),
                landmarks5=np.array([[100, 110], [156, 110], [128, 140], [104, 165], [152, 165]], np.float32),
                score=1.0,
            )
            crops = self.liveness.crops(img, face)
            for b in _batch_sizes(self.liveness, self._liveness_batcher):
                self._liveness_batcher.submit_many([crops] * b)

    def close(self) -> None:
        if self._detect_batcher is not None:
            self._detect_batcher.close()
        for b in self._embed_batchers.values():
            b.close()
        if self._liveness_batcher is not None:
            self._liveness_batcher.close()


def _batch_sizes(model_owner, batcher: MicroBatcher | Inline | None) -> list[int]:
    """The batch sizes a model behind ``batcher`` runs at: one, or each padded bucket on CUDA."""
    top = batcher.max_batch if batcher is not None else 1
    models = getattr(model_owner, "models", None) or [getattr(model_owner, "model", None)]
    sizes = {b for m in models if isinstance(m, LoadedModel) for b in m.buckets(top)}
    return sorted(sizes) or [1]
