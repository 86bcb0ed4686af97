"""Voice scorers for `biogate eval` (services/common/evaluation): the local pipeline, no server.

Channels (``--channel``):
  ``wideband`` (default): the file as recorded (16 kHz fixtures);
  ``telephony-8k``: enrolment and probe both pass through the telephone simulation
  (300-3400 Hz, 8 kHz G.711 mu-law) and enter the pipeline as raw mu-law bytes, as from the IVR.
A ``-3s`` suffix (``wideband-3s``, ``telephony-8k-3s``) crops every file to its middle 3 s first,
as the reference run of the issue (first-3 s crops hold up to 0.5 s of leading silence).

Scores are the service's: cosine, and with ``voice.score_normalisation: asnorm`` adaptive s-norm
against the configured cohort (the default cohort holds none of the fixture speakers; see
cohort.py), so that `biogate calibrate` fits thresholds on the numbers the service compares. Refused audio is a
:class:`Failure` whose reason is the ingest error code in lower case.
The PAD scorer is the service's synthetic-speech layer (AASIST on the most speech-dense window of
the channel's length, bona fide log-odds) on the same channels, after the same ingest and VAD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from services.common.evaluation.scorers import Failure, ScorerOptions
from services.common.models import ModelStore

from . import telephone
from .antispoof import SyntheticSpeechDetector
from .cohort import FAMILIES, SNorm, score_name
from .ingest import AudioError, AudioFormat, Encoding
from .models import VoiceModels, pipeline_from_settings
from .pipeline import PreparedAudio, VoicePipeline

CHANNELS = ("wideband", "telephony-8k")
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


def prepare_channel(pipeline: VoicePipeline, path: Path, telephone_channel: bool, crop_s: float | None) -> PreparedAudio:
    x, rate = read_channel(path, telephone_channel, crop_s)
    return pipeline.prepare(x, _MULAW_8K) if telephone_channel else pipeline.prepare_samples(x, rate)


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


def make_verification_scorer(options: ScorerOptions) -> VoiceVerificationScorer:
    """The service's scoring (s-norm against the configured cohort) on the local pipeline. The
    evaluation scores every file it can: the verify minimum of net speech applies to all."""
    from .engine import load_or_build_cohort

    telephone_channel, crop = parse_channel(options.channel)
    pipeline = pipeline_from_settings(options.settings)
    cfg = options.settings.voice
    if cfg.score_normalisation == "none":
        return VoiceVerificationScorer(pipeline, telephone_channel, crop)
    cohort = load_or_build_cohort(options.settings, pipeline)
    family = FAMILIES[1] if telephone_channel else FAMILIES[0]
    return VoiceVerificationScorer(pipeline, telephone_channel, crop, SNorm(cohort.family(family), cfg.snorm_top_k),
                                   score_name(cohort, cfg.snorm_top_k))


class VoicePadScorer:
    def __init__(self, pipeline: VoicePipeline, detector: SyntheticSpeechDetector, telephone_channel: bool = False,
                 crop_s: float | None = None, score_name: str = "bonafide_log_odds") -> None:
        self.pipeline, self.detector = pipeline, detector
        self.telephone_channel, self.crop_s, self.score_name = telephone_channel, crop_s, score_name

    def score(self, path: Path) -> float | Failure:
        try:
            prepared = prepare_channel(self.pipeline, Path(path), self.telephone_channel, self.crop_s)
        except AudioError as err:
            return Failure(err.code.value.lower())
        return self.detector.score(prepared)


def make_pad_scorer(options: ScorerOptions) -> VoicePadScorer:
    """The configured synthetic-speech detector (voice.antispoof) on the service's window."""
    from .engine import antispoof_window_s, pad_score_name

    cfg = options.settings.voice
    if not cfg.antispoof:
        raise ValueError("voice.antispoof is empty (the layer is off): set it to the detector to evaluate")
    telephone_channel, crop = parse_channel(options.channel)
    window_s = antispoof_window_s(cfg, FAMILIES[1] if telephone_channel else FAMILIES[0])  # the service's window
    store = ModelStore(options.settings)
    detector = VoiceModels.choose(store.manifest, cfg).antispoof_detector(store, threads=1, device="cpu")
    return VoicePadScorer(pipeline_from_settings(options.settings), SyntheticSpeechDetector(detector, window_s),
                          telephone_channel, crop, pad_score_name(window_s))
