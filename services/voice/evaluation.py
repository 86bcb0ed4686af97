"""Voice scorers for `biogate eval` (services/common/evaluation): the local pipeline, no server.

Channels (``--channel``):
  ``wideband`` (default): the file as recorded (16 kHz fixtures);
  ``telephony-8k``: enrolment and probe both pass through the telephone simulation
  (300-3400 Hz, 8 kHz G.711 mu-law) and enter the pipeline as raw mu-law bytes, as from the IVR.
  ``narrowband-16k`` (PAD only, a measurement): the file band-limited to 4 kHz in its 16 kHz clip
  (8 kHz and back, telephone.narrowband), as a Bluetooth headset gives a phone app, on the telephone
  window. The service has no such channel: records fitted on it failed their held-out checks
  (bench/RESULTS.md, "A narrowband-16k AASIST record" and its second try), so with ``decide`` it is
  NotCalibrated.
A ``-3s`` suffix (``wideband-3s``, ``telephony-8k-3s``) crops every file to its middle 3 s first,
as the reference run of the issue (first-3 s crops hold up to 0.5 s of leading silence).

Scores are the service's: cosine, and with ``voice.score_normalisation: asnorm`` adaptive s-norm
against the configured cohort (the default cohort holds none of the fixture speakers; see
cohort.py), so that `biogate calibrate` fits thresholds on the numbers the service compares. Refused audio is a
:class:`Failure` whose reason is the ingest error code in lower case.
The PAD scorer is the service's synthetic-speech layer (AASIST on the most speech-dense window of
the channel's length, bona fide log-odds) on the same channels, after the same ingest and VAD.

Decisions (unless ``--scores-only``): :class:`VoiceDecisionScorer` runs the service's own engine
(:class:`VoiceEngine`: the same ECAPA batcher, thresholds, AASIST layer and replay check, the
cache in memory) with the service's enrolment rule (services/voice/enrolment.py) and the tenant's
policy (``--tenant``, default "eval"): every trial gets the decision the service would give, and
the refusing layer. The PAD scorer decides at the AASIST record's threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

import hashlib

from services.common.evaluation.scorers import Decision, Failure, Scored, ScorerOptions
from services.common.models import ModelStore

from . import telephone
from .antispoof import SyntheticSpeechDetector
from .cohort import FAMILIES, SNorm, score_name
from .ingest import AudioError, AudioFormat, Encoding
from .models import VoiceModels, pipeline_from_settings
from .pipeline import PreparedAudio, Purpose, VoicePipeline
from .config import voice_config

CHANNELS = ("wideband", "telephony-8k")
NARROWBAND_CHANNEL = "narrowband-16k"  # the PAD scorer's channel for narrowband speech in a 16 kHz clip
_MULAW_8K = AudioFormat(Encoding.MULAW, 8000)


def parse_channel(channel: str | None) -> tuple[bool, float | None]:
    """-> (telephone simulation, crop seconds)"""
    name = channel or "wideband"
    crop = None
    if name.endswith("-3s"):
        name, crop = name[:-3], 3.0
    if name not in CHANNELS:
        raise ValueError(f"voice channel {channel!r}: expected one of {CHANNELS}, optionally with -3s")
    return name == "telephony-8k", crop


def read_channel(path: Path, telephone_channel: bool, crop_s: float | None) -> tuple[np.ndarray | bytes, int]:
    """A fixture file as the channel delivers it: float samples, or 8 kHz mu-law bytes."""
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if crop_s:
        n = int(crop_s * rate)
        x = x[max(0, (len(x) - n) // 2) :][:n]
    return (telephone.encode(x, rate), 8000) if telephone_channel else (x, rate)


def prepare_channel(pipeline: VoicePipeline, path: Path, telephone_channel: bool, crop_s: float | None,
                    purpose: Purpose = "verify") -> PreparedAudio:
    x, rate = read_channel(path, telephone_channel, crop_s)
    if isinstance(x, bytes):  # the telephone channel's mu-law
        return pipeline.prepare(x, _MULAW_8K, purpose)
    return pipeline.prepare_samples(x, rate, purpose)


EVAL_TENANT = "eval"


def subject_for(paths: Sequence[Path], channel: str) -> str:
    """The evaluation subject of an enrolment (the same id locally and through the service)."""
    # Letters only: an id of digits could look like a personal number and be refused.
    digest = hashlib.sha256(("|".join(str(p) for p in paths) + channel).encode()).hexdigest()[:20]
    return "ev-" + digest.translate(str.maketrans("0123456789", "ghijklmnop"))


def decision_of(match: bool, reasons: Sequence[str], spoof_checked: bool, spoof_passed: bool,
                challenge_checked: bool = False, challenge_passed: bool = True) -> Decision:
    """The layers of a voice decision as the service reports them (services/voice/engine.py)."""
    layers = [("comparison", "NO_MATCH" not in reasons)]
    if spoof_checked:
        layers.append(("anti_spoofing", spoof_passed))
    if challenge_checked:
        layers.append(("challenge", challenge_passed))
    decision = Decision.of_layers(layers, tuple(reasons))
    if decision.accepted != match:
        raise ValueError(f"a voice decision match={match} with reasons {list(reasons)}: the layers do not explain it")
    return decision


class VoiceDecisionScorer:
    """The service's decisions, in process: enrolment rule, engine, tenant policy, replay check."""

    def __init__(self, engine, settings, channel: str | None = None, tenant: str = EVAL_TENANT) -> None:
        from .engine import channel_target_fmr

        self.engine, self.cfg, self.channel, self.tenant = engine, settings.voice, channel or "wideband", tenant
        self.telephone_channel, self.crop_s = parse_channel(channel)
        self.family = FAMILIES[1] if self.telephone_channel else FAMILIES[0]
        policy = self.cfg.tenants.get(tenant)
        self.target_fmr = (policy.target_fmr if policy and policy.target_fmr
                           else channel_target_fmr(self.cfg, self.family))
        self.synthetic_on = policy.synthetic_speech_check if policy else True
        self.score_name = engine.score_name

    def _prepare(self, path: Path, purpose: Purpose) -> PreparedAudio | Failure:
        try:
            return prepare_channel(self.engine.pipeline, Path(path), self.telephone_channel, self.crop_s, purpose)
        except AudioError as err:
            return Failure(err.code.value.lower())

    def enroll(self, paths: Sequence[Path]) -> tuple[str, np.ndarray] | Failure:
        from . import enrolment, replay

        attempts = [self._prepare(p, "enroll") for p in paths]
        failed = next((p for p in attempts if isinstance(p, Failure)), None)
        if failed is not None:
            return failed
        prepared = [p for p in attempts if not isinstance(p, Failure)]
        try:
            enrolment.check_total_speech(prepared, self.cfg)
            layers = [self.engine.synthetic_check(p, self.family, self.synthetic_on) for p in prepared]
            kept = enrolment.keep_passing(prepared, layers, self.cfg)
        except enrolment.EnrolmentRefused as err:
            return Failure(err.code.lower(), "anti_spoofing" if err.code == "SPOOF_SUSPECTED" else "acquisition")
        subject = subject_for(paths, self.channel)
        self.engine.replay.erase(self.tenant, subject)  # a re-enrolment (replace=True) starts afresh
        for p in kept.utterances:
            self.engine.replay.remember(self.tenant, subject, replay.fingerprint(p.samples))
        return subject, enrolment.template_of(self.engine.embed(kept.utterances))

    def score(self, handle: tuple[str, np.ndarray], probe: Path) -> Scored | Failure:
        prepared = self._prepare(probe, "verify")
        if isinstance(prepared, Failure):
            return prepared
        subject, template = handle
        d = self.engine.decide(self.tenant, subject, template, prepared, self.family, self.target_fmr,
                               self.synthetic_on, None)
        return Scored(d.speaker.score, decision_of(d.match, d.reasons, d.synthetic.checked or d.replay.checked,
                                                   d.spoof_passed))

    def close(self) -> None:
        self.engine.close()


def local_engine(settings):
    """The service's VoiceEngine with an in-memory replay cache and no encryption (nothing leaves
    the process)."""
    from . import replay
    from .engine import VoiceEngine

    cfg = settings.voice
    store = ModelStore(settings)
    cache = replay.ReplayCache(replay.MemoryReplayStore(cfg.replay_retention_s, cfg.replay_max_per_subject),
                               lambda _b, x: x, lambda _b, x: x, lambda _t, s: s)
    return VoiceEngine(settings, store, VoiceModels.choose(store.manifest, cfg), cache)


class VoiceVerificationScorer:
    def __init__(self, pipeline: VoicePipeline, telephone_channel: bool = False, crop_s: float | None = None,
                 snorm: SNorm | None = None, score_name: str = "cosine") -> None:
        self.pipeline, self.telephone_channel, self.crop_s = pipeline, telephone_channel, crop_s
        self.snorm, self.score_name = snorm, score_name
        self._cache: dict[Path, np.ndarray | Failure] = {}

    def embedding(self, path: Path) -> np.ndarray | Failure:
        if path not in self._cache:
            self._cache[path] = self._embed(path)
        return self._cache[path]

    def _embed(self, path: Path) -> np.ndarray | Failure:
        try:
            prepared = prepare_channel(self.pipeline, path, self.telephone_channel, self.crop_s)
        except AudioError as err:
            return Failure(err.code.value.lower())
        return self.pipeline.embed([prepared])[0]

    def enroll(self, paths: Sequence[Path]) -> np.ndarray | Failure:
        embs = [self.embedding(Path(p)) for p in paths]
        good = [e for e in embs if not isinstance(e, Failure)]
        if not good:
            return next(e for e in embs if isinstance(e, Failure))
        mean = np.mean(good, axis=0)
        return mean / np.linalg.norm(mean)

    def score(self, handle: np.ndarray, probe: Path) -> float | Failure:
        e = self.embedding(Path(probe))
        if isinstance(e, Failure):
            return e
        cosine = float(np.dot(handle, e))
        return cosine if self.snorm is None else float(self.snorm.normalise(cosine, handle, e)[0])


def make_verification_scorer(options: ScorerOptions) -> VoiceVerificationScorer | VoiceDecisionScorer:
    """Decisions: the service's engine and rules (:class:`VoiceDecisionScorer`). Scores only: the
    service's scoring (s-norm against the configured cohort) on the local pipeline, every file it
    can score (the verify minimum of net speech applies to enrolments too)."""
    from .engine import load_or_build_cohort

    if options.decide:
        return VoiceDecisionScorer(local_engine(options.settings), options.settings, options.channel,
                                   options.tenant or EVAL_TENANT)
    telephone_channel, crop = parse_channel(options.channel)
    pipeline = pipeline_from_settings(options.settings)
    cfg = voice_config(options.settings)
    if cfg.score_normalisation == "none":
        return VoiceVerificationScorer(pipeline, telephone_channel, crop)
    cohort = load_or_build_cohort(options.settings, pipeline)
    family = FAMILIES[1] if telephone_channel else FAMILIES[0]
    return VoiceVerificationScorer(pipeline, telephone_channel, crop, SNorm(cohort.family(family), cfg.snorm_top_k),
                                   score_name(cohort, cfg.snorm_top_k))


class VoicePadScorer:
    def __init__(self, pipeline: VoicePipeline, detector: SyntheticSpeechDetector, telephone_channel: bool = False,
                 crop_s: float | None = None, score_name: str = "bonafide_log_odds",
                 threshold: float | None = None, narrowband: bool = False) -> None:
        self.pipeline, self.detector, self.narrowband = pipeline, detector, narrowband
        self.telephone_channel, self.crop_s, self.score_name = telephone_channel, crop_s, score_name
        self.threshold = threshold

    def score(self, path: Path) -> float | Scored | Failure:
        try:
            if self.narrowband:
                x, rate = read_channel(Path(path), False, self.crop_s)
                prepared = self.pipeline.prepare_samples(telephone.narrowband(np.asarray(x), int(rate)), rate, "verify")
            else:
                prepared = prepare_channel(self.pipeline, Path(path), self.telephone_channel, self.crop_s)
        except AudioError as err:
            return Failure(err.code.value.lower())
        value = self.detector.score(prepared)
        if self.threshold is None:
            return value
        passed = value >= self.threshold
        return Scored(value, Decision.of_layers([("synthetic_speech", passed)], () if passed else ("SPOOF_SUSPECTED",)))


def make_pad_scorer(options: ScorerOptions) -> VoicePadScorer:
    """The configured synthetic-speech detector (voice.antispoof) on the service's window."""
    from .engine import antispoof_cut, antispoof_window_s, pad_score_name

    cfg = voice_config(options.settings)
    if not cfg.antispoof:
        raise ValueError("voice.antispoof is empty (the layer is off): set it to the detector to evaluate")
    narrowband = options.channel == NARROWBAND_CHANNEL
    telephone_channel, crop = (False, None) if narrowband else parse_channel(options.channel)
    family = FAMILIES[1] if telephone_channel or narrowband else FAMILIES[0]
    window_s = antispoof_window_s(cfg, family)  # the service's window (narrowband: the telephone one)
    cut = antispoof_cut(cfg, family)
    store = ModelStore(options.settings)
    models = VoiceModels.choose(store.manifest, cfg)
    detector = models.antispoof_detector(store, threads=1, device="cpu")
    if detector is None or models.antispoof is None:
        raise ValueError("voice.antispoof names no detector: set it to the detector to evaluate")
    threshold = None
    if options.decide:
        from services.common.modality.calibration import Calibrations

        threshold = Calibrations(options.settings.models.manifest, 0.0).threshold(
            models.antispoof.id, NARROWBAND_CHANNEL if narrowband else cfg.calibration_channels.get(family, family),
            cfg.antispoof_target_apcer,
            pad_score_name(window_s, cut))
    return VoicePadScorer(pipeline_from_settings(options.settings), SyntheticSpeechDetector(detector, window_s, cut),
                          telephone_channel, crop, pad_score_name(window_s, cut), threshold, narrowband)
