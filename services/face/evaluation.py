"""Face scorers for `biogate eval` (services/common/evaluation): the local pipeline, no server.

The rules are the service's (services/face/rules.py, services/face/subject.py): the tenant's subject
policy, an image with any issue left out of an enrolment (refused when none is left, or when the
images are of different people), a probe with an issue refused before comparison. A refused image
is a :class:`Failure` whose reason is the decode, subject or quality code in lower case. A reference
is the normalised mean of its images' embeddings; the score is the cosine, averaged over the
configured embedders when there are several (score fusion).

Decisions (unless ``--scores-only``): the service's, at the manifest's calibrated thresholds for the
configured (or the tenant's) operating point: verification accepts when the comparison passes;
PAD when the ensemble's live probability reaches the liveness threshold, and gives no answer (a
non-response) for an image without one clear subject face, as CheckLiveness does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from services.common.evaluation.scorers import Decision, Failure, Scored, ScorerOptions
from services.common.modality.calibration import Calibrations
from services.common.models import ModelStore
from services.face.imaging import ImageDecodeError
from services.face.models import pipeline_config
from services.face.pipeline import FaceAnalysis, FacePipeline
from services.face.rules import EnrolmentRefused, enrolment_template, liveness_unanswerable
from services.face.subject import SubjectPolicy, subject_policy
from services.face.config import face_config

SAME_PERSON_FMR = 1e-2  # the enrolment's same-person check (FaceService.same_person_floor)


def _analyse(pipeline: FacePipeline, path: Path, subject: SubjectPolicy | None = None,
             **options) -> FaceAnalysis | Failure:
    try:
        return pipeline.analyse(Path(path).read_bytes(), subject=subject, **options)
    except ImageDecodeError as err:
        return Failure(err.code.value.lower(), "decode")


def _refusal(a: FaceAnalysis) -> Failure:
    return Failure(a.issues[0].lower(), "quality")


class FaceVerificationScorer:
    score_name = "cosine"

    def __init__(self, pipeline: FacePipeline, embedders: Sequence[str] | None = None,
                 threshold: float | None = None, same_person_floor: float | None = None,
                 subject: SubjectPolicy | None = None) -> None:
        """``embedders``: the names whose cosines are averaged (default: all of the pipeline's).
        ``threshold``: decide at it as the service does (None: scores only)."""
        self.pipeline = pipeline
        self.names = tuple(embedders) if embedders else tuple(pipeline.embedders)
        unknown = set(self.names) - set(pipeline.embedders)
        if unknown:
            raise ValueError(f"embedders not in the pipeline: {sorted(unknown)}")
        self.threshold, self.same_person_floor, self.subject = threshold, same_person_floor, subject
        self._cache: dict[Path, FaceAnalysis | Failure] = {}

    def analysis(self, path: Path) -> FaceAnalysis | Failure:
        path = Path(path)
        if path not in self._cache:
            self._cache[path] = _analyse(self.pipeline, path, self.subject)
        return self._cache[path]

    def embeddings(self, path: Path) -> dict[str, np.ndarray] | Failure:
        a = self.analysis(path)
        if isinstance(a, Failure):
            return a
        return _refusal(a) if not a.accepted else a.embeddings

    def enroll(self, paths: Sequence[Path]) -> dict[str, np.ndarray] | Failure:
        analyses = [self.analysis(p) for p in paths]
        decoded = [a for a in analyses if not isinstance(a, Failure)]
        failures = [a for a in analyses if isinstance(a, Failure)]
        if not decoded:
            return failures[0]
        if failures:  # the service refuses a request with an undecodable image
            return failures[0]
        try:
            return {name: enrolment_template(decoded, name, self.same_person_floor)[0] for name in self.names}
        except EnrolmentRefused as err:
            return Failure(err.code.lower(), "quality" if err.code != "IDENTITY_INCONSISTENT" else "enrolment")

    def score(self, handle: dict[str, np.ndarray], probe: Path) -> float | Scored | Failure:
        e = self.embeddings(probe)
        if isinstance(e, Failure):
            return e
        score = float(np.mean([np.dot(handle[name], e[name]) for name in handle]))
        if self.threshold is None:
            return score
        passed = score >= self.threshold
        return Scored(score, Decision.of_layers([("comparison", passed)], () if passed else ("NO_MATCH",)))


class FacePadScorer:
    score_name = "p_bonafide"

    def __init__(self, pipeline: FacePipeline, threshold: float | None = None,
                 subject: SubjectPolicy | None = None) -> None:
        self.pipeline, self.threshold, self.subject = pipeline, threshold, subject

    def score(self, path: Path) -> float | Scored | Failure:
        a = _analyse(self.pipeline, path, self.subject, liveness=True, embed=False)
        if isinstance(a, Failure):
            return a
        if liveness_unanswerable(a):
            return _refusal(a)
        if a.liveness is None:
            raise RuntimeError("liveness was requested but not measured")
        live = float(a.liveness)
        if self.threshold is None:
            return live
        passed = live >= self.threshold
        return Scored(live, Decision.of_layers([("liveness", passed)], () if passed else ("LIVENESS_FAILED",)))


def _calibrations(options: ScorerOptions) -> Calibrations:
    return Calibrations(options.settings.models.manifest, 0.0)


def make_verification_scorer(options: ScorerOptions) -> FaceVerificationScorer:
    cfg = face_config(options.settings)
    threshold = floor = None
    if options.decide:
        from services.face.service import EMBEDDER_SCORE

        cal = _calibrations(options)
        own = cfg.tenants.get(options.tenant) if options.tenant else None
        target = (own.target_fmr if own is not None else None) or cfg.target_fmr
        threshold = cal.threshold(cfg.embedder, cfg.calibration_channel, target, EMBEDDER_SCORE)
        rec = cal.find(cfg.embedder, cfg.calibration_channel)
        point = rec.point(SAME_PERSON_FMR) if rec is not None else None
        floor = point.threshold if point is not None and point.supported else None
    return FaceVerificationScorer(FacePipeline(pipeline_config(ModelStore(options.settings), liveness=())),
                                  threshold=threshold, same_person_floor=floor,
                                  subject=subject_policy(cfg, options.tenant))


def make_pad_scorer(options: ScorerOptions) -> FacePadScorer:
    cfg = face_config(options.settings)
    threshold = None
    if options.decide and cfg.liveness:
        from services.face.service import LIVENESS_SCORE

        threshold = _calibrations(options).threshold(cfg.liveness[0], cfg.calibration_channel,
                                                     cfg.liveness_target_apcer, LIVENESS_SCORE)
    return FacePadScorer(FacePipeline(pipeline_config(ModelStore(options.settings))), threshold,
                         subject_policy(cfg, options.tenant))
