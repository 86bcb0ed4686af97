"""The voice model zoo: configured model ids -> the objects the voice pipeline and engine run.

One router per role maps a manifest entry's ``architecture`` to the module that runs it
(ecapa.py, vad.py, aasist.py); the entry names the files (``main``, ``config_file``) and, for the
speaker embedder, the ONNX export the service runs, derived from the checkpoint once into the
cache's ``.derived`` folder under the name the entry's ``export`` gives (a new checkpoint, a new
export). The configuration (voice.embedder, voice.vad, voice.antispoof) names model ids only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from services.voice.config import VoiceConfig
from services.common.models import ModelStore
from services.common.models.manifest import Manifest, ModelSpec
from services.common.modality.zoo import ModelChoiceError, Router, fetch_verified

from .aasist import CPU_OPTIONS, AasistDetector, AasistOptions
from .digits import DigitRecognizer
from .ecapa import EcapaOnnx, export_onnx
from .pipeline import VoicePipeline, VoicePipelineConfig
from . import replay as replay_mod
from .vad import SileroVad, VadParams

# export.recipe of a manifest entry -> (the input file, the output path) -> writes the output
EXPORT_RECIPES: dict[str, Callable[[Path, Path], object]] = {
    "ecapa_onnx": lambda checkpoint, out: export_onnx(checkpoint.parent, out),
}


def exported(store: ModelStore, spec: ModelSpec) -> Path:
    """The entry's derived file (see ExportSpec in the manifest schema), made on first use."""
    if spec.export is None or spec.export.recipe not in EXPORT_RECIPES:
        raise ModelChoiceError(f"{spec.id!r}: the manifest entry names no export this service can make "
                               f"(recipes: {', '.join(EXPORT_RECIPES)})")
    out = store.cache_dir / ".derived" / spec.export_name
    if not out.exists():
        EXPORT_RECIPES[spec.export.recipe](store.path(spec.id, spec.export.input), out)
    return out


def _ecapa(store: ModelStore, spec: ModelSpec, *, providers: Sequence[str], threads: int | None,
           max_batch: int, max_pad_ratio: float, device_features: bool | None = None,
           io_binding: bool | None = None, frame_buckets: bool = False) -> EcapaOnnx:
    return EcapaOnnx(exported(store, spec), providers=providers, threads=threads, max_batch=max_batch,
                     max_pad_ratio=max_pad_ratio, device_features=device_features, io_binding=io_binding,
                     frame_buckets=frame_buckets)


def _silero(store: ModelStore, spec: ModelSpec, *, params: VadParams) -> SileroVad:
    return SileroVad(store.path(spec.id), params)


def _aasist(store: ModelStore, spec: ModelSpec, *, threads: int | None, device: str,
            options: AasistOptions = CPU_OPTIONS) -> AasistDetector:
    if spec.config_file is None:
        raise ModelChoiceError(f"{spec.id!r}: the manifest entry names no config_file for the network")
    return AasistDetector(store.path(spec.id), store.path(spec.id, spec.config_file), threads=threads,
                          max_windows=1, device=device, options=options)


def _envelope_xcorr(spec: ModelSpec) -> Callable:
    if spec.version != str(replay_mod.VERSION):
        raise ModelChoiceError(f"voice.replay: {spec.id!r} is version {spec.version!r} of the fingerprint; this "
                               f"service computes version {replay_mod.VERSION} (services/voice/replay.py)")
    return replay_mod.fingerprint


def _whisper_ct2(store: ModelStore, spec: ModelSpec, *, workers: int, threads: int) -> DigitRecognizer:
    return DigitRecognizer(store.path(spec.id).parent, workers, threads)


SPEAKER_EMBEDDERS = Router("speaker_embedder", "voice.embedder", {"ecapa-tdnn-speechbrain": _ecapa})
VADS = Router("vad", "voice.vad", {"silero-vad": _silero})
ANTISPOOF = Router("voice_antispoof", "voice.antispoof", {"aasist": _aasist})
DIGIT_RECOGNIZERS = Router("digit_recognizer", "voice.digits", {"whisper-ct2": _whisper_ct2})
REPLAY = Router("voice_replay", "voice.replay", {"envelope-xcorr": _envelope_xcorr})


@dataclass(frozen=True)
class VoiceModels:
    """The manifest entries the configuration chose (antispoof None: the layer is off)."""

    embedder: ModelSpec
    vad: ModelSpec
    antispoof: ModelSpec | None
    digits: ModelSpec
    replay: ModelSpec  # code in this repository, no files: the entry holds the cache's calibration

    @classmethod
    def choose(cls, manifest: Manifest, cfg: VoiceConfig) -> "VoiceModels":
        """Raises ModelChoiceError naming the setting and the id of a model the service cannot run."""
        chosen = cls(SPEAKER_EMBEDDERS.spec(manifest, cfg.embedder), VADS.spec(manifest, cfg.vad),
                     ANTISPOOF.spec(manifest, cfg.antispoof) if cfg.antispoof else None,
                     DIGIT_RECOGNIZERS.spec(manifest, cfg.digits), REPLAY.spec(manifest, cfg.replay))
        REPLAY.builder(chosen.replay)(chosen.replay)  # the version check
        return chosen

    @property
    def ids(self) -> list[str]:
        """The models with files (the replay fingerprint is code)."""
        return [m.id for m in (self.embedder, self.vad, self.antispoof, self.digits) if m is not None]

    def fetch(self, store: ModelStore) -> None:
        fetch_verified(store, self.ids)

    def pipeline(self, store: ModelStore, config: VoicePipelineConfig) -> VoicePipeline:
        vad = VADS.builder(self.vad)(store, self.vad, params=VadParams(threshold=config.vad_threshold))
        embedder = SPEAKER_EMBEDDERS.builder(self.embedder)(
            store, self.embedder, providers=config.providers, threads=config.threads, max_batch=config.max_batch,
            max_pad_ratio=config.max_pad_ratio, device_features=config.device_features, io_binding=config.io_binding,
            frame_buckets=config.frame_buckets)
        return VoicePipeline(config, vad, embedder)

    def digit_recognizer(self, store: ModelStore, *, workers: int, threads: int) -> DigitRecognizer:
        return DIGIT_RECOGNIZERS.builder(self.digits)(store, self.digits, workers=workers, threads=threads)

    def antispoof_detector(self, store: ModelStore, threads: int | None, device: str,
                           options: AasistOptions = CPU_OPTIONS) -> AasistDetector | None:
        if self.antispoof is None:
            return None
        return ANTISPOOF.builder(self.antispoof)(store, self.antispoof, threads=threads, device=device,
                                                 options=options)


def aasist_options(cfg: VoiceConfig, device: str) -> AasistOptions:
    """The service's AASIST options on ``device`` (padding's None: on CUDA, or when compiled, where
    each new batch size would be a compilation)."""
    pad = cfg.antispoof_pad_batches
    if pad is None:
        pad = device == "cuda" or cfg.antispoof_compile
    return AasistOptions(dtype=cfg.antispoof_dtype, compile=cfg.antispoof_compile,
                         compile_backend=cfg.antispoof_compile_backend, pad_batches=pad,
                         max_batch=cfg.antispoof_batch_max)


def pipeline_config(cfg: VoiceConfig, providers: tuple[str, ...]) -> VoicePipelineConfig:
    """The service's pipeline settings (the models come from :class:`VoiceModels`)."""
    return VoicePipelineConfig(
        providers=providers, threads=cfg.intra_op_threads or None,
        min_net_speech_enroll_s=cfg.min_net_speech_enroll_s, min_net_speech_verify_s=cfg.min_net_speech_verify_s,
        stream_target_net_speech_s=cfg.stream_target_net_speech_s, max_duration_s=cfg.max_duration_s,
        max_batch=cfg.batch_max, max_pad_ratio=cfg.max_pad_ratio, max_embed_s=cfg.max_embed_s,
        max_batch_audio_s=cfg.max_batch_audio_s,
        device_features=cfg.ecapa_device_features, io_binding=cfg.ecapa_io_binding,
        frame_buckets=cfg.ecapa_frame_buckets,
    )


def pipeline_from_settings(settings, **overrides) -> VoicePipeline:
    """The service's pipeline of the configured models, outside a service (evaluation, tools)."""
    store = ModelStore(settings)
    providers = overrides.pop("providers", tuple(settings.models.providers))
    config = pipeline_config(settings.voice, providers)
    return VoiceModels.choose(store.manifest, settings.voice).pipeline(store, replace(config, **overrides) if overrides else config)


@dataclass(frozen=True)
class VoiceModelFiles:
    """Where the configured speaker embedder and VAD are (for tests and benchmarks of the parts)."""

    vad: Path  # silero_vad.onnx
    ecapa_dir: Path  # the SpeechBrain model directory
    ecapa_onnx: Path  # the exported network


def model_files(store: ModelStore, cfg: VoiceConfig | None = None) -> VoiceModelFiles:
    """The verified files (raises ModelUnavailableError with a fetch hint when missing)."""
    chosen = VoiceModels.choose(store.manifest, cfg or VoiceConfig())
    return VoiceModelFiles(vad=store.path(chosen.vad.id), ecapa_dir=store.path(chosen.embedder.id).parent,
                           ecapa_onnx=exported(store, chosen.embedder))
