"""Voice scorers for `biogate eval` (services/common/evaluation): the local pipeline, no server.

Channels (``--channel``):
  ``wideband`` (default): the file as recorded (16 kHz fixtures);
  ``telephony-8k``: enrolment and probe both pass through the telephone simulation
  (300-3400 Hz, 8 kHz G.711 mu-law) and enter the pipeline as raw mu-law bytes, as from the IVR.
A ``-3s`` suffix (``wideband-3s``, ``telephony-8k-3s``) crops every file to its middle 3 s first,
as the reference run of the issue (first-3 s crops hold up to 0.5 s of leading silence).

Refused audio is a :class:`Failure` whose reason is the ingest error code in lower case.
The PAD scorer is AASIST (bona fide log-odds) on the same channels, after the same ingest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from services.common.evaluation.scorers import Failure, ScorerOptions
from services.common.models import ModelStore

from . import telephone
from .aasist import AasistDetector
from .ingest import AudioError, AudioFormat, Encoding, IngestLimits, condition, ingest
from .models import resolve
from .pipeline import VoicePipeline, VoicePipelineConfig

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


class VoiceVerificationScorer:
    score_name = "cosine"

    def __init__(self, pipeline: VoicePipeline, telephone_channel: bool = False, crop_s: float | None = None) -> None:
        self.pipeline, self.telephone_channel, self.crop_s = pipeline, telephone_channel, crop_s
        self._cache: dict[Path, np.ndarray | Failure] = {}

    def embedding(self, path: Path) -> np.ndarray | Failure:
        if path not in self._cache:
            self._cache[path] = self._embed(path)
        return self._cache[path]

    def _embed(self, path: Path) -> np.ndarray | Failure:
        x, rate = read_channel(path, self.telephone_channel, self.crop_s)
        try:
            if self.telephone_channel:
                prepared = self.pipeline.prepare(x, _MULAW_8K)
            else:
                prepared = self.pipeline.prepare_samples(x, rate)
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
        return e if isinstance(e, Failure) else float(np.dot(handle, e))


def pipeline_from_settings(settings, **overrides) -> VoicePipeline:
    paths = resolve(ModelStore(settings))
    return VoicePipeline(VoicePipelineConfig(vad_model=paths.vad, ecapa_model=paths.ecapa_onnx, **overrides))


def make_verification_scorer(options: ScorerOptions) -> VoiceVerificationScorer:
    telephone_channel, crop = parse_channel(options.channel)
    # Evaluation scores every file it can: the verify minimum of net speech applies to all.
    return VoiceVerificationScorer(pipeline_from_settings(options.settings), telephone_channel, crop)


class VoicePadScorer:
    score_name = "bonafide_log_odds"

    def __init__(self, detector: AasistDetector, telephone_channel: bool = False, crop_s: float | None = None,
                 limits: IngestLimits = IngestLimits()) -> None:
        self.detector, self.telephone_channel, self.crop_s, self.limits = detector, telephone_channel, crop_s, limits

    def score(self, path: Path) -> float | Failure:
        x, rate = read_channel(Path(path), self.telephone_channel, self.crop_s)
        try:
            audio = ingest(x, _MULAW_8K, self.limits) if isinstance(x, bytes) else condition(x, rate, limits=self.limits)
        except AudioError as err:
            return Failure(err.code.value.lower())
        return self.detector.score(audio.samples)


def make_pad_scorer(options: ScorerOptions) -> VoicePadScorer:
    telephone_channel, crop = parse_channel(options.channel)
    store = ModelStore(options.settings)
    detector = AasistDetector(store.path("aasist", "AASIST.pth"), store.path("aasist", "AASIST_config.json"))
    return VoicePadScorer(detector, telephone_channel, crop)
