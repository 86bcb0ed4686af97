"""Face scorers for `biogate eval` (services/common/evaluation): the local pipeline, no server.

Verification: an image is refused (a :class:`Failure` whose reason is the decode, subject or
quality code in lower case) exactly as enrolment would refuse it. A reference is the normalised
mean of its images' embeddings; the score is the cosine, averaged over the configured embedders
when there are several (score fusion). PAD: the mean live probability of the MiniFASNet ensemble.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from services.common.evaluation.scorers import Failure, ScorerOptions
from services.common.models import ModelStore
from services.face.embedding import l2_normalise
from services.face.imaging import ImageDecodeError
from services.face.models import pipeline_config
from services.face.pipeline import FaceAnalysis, FacePipeline


def _analyse(pipeline: FacePipeline, path: Path, **options) -> FaceAnalysis | Failure:
    try:
        result = pipeline.analyse(Path(path).read_bytes(), **options)
    except ImageDecodeError as err:
        return Failure(err.code.value.lower())
    if not options.get("liveness") and not result.accepted:
        return Failure(result.issues[0].lower())
    if result.face is None:
        return Failure(result.issues[0].lower())
    return result


class FaceVerificationScorer:
    score_name = "cosine"

    def __init__(self, pipeline: FacePipeline, embedders: Sequence[str] | None = None) -> None:
        """``embedders``: the names whose cosines are averaged (default: all of the pipeline's)."""
        self.pipeline = pipeline
        self.names = tuple(embedders) if embedders else tuple(pipeline.embedders)
        unknown = set(self.names) - set(pipeline.embedders)
        if unknown:
            raise ValueError(f"embedders not in the pipeline: {sorted(unknown)}")
        self._cache: dict[Path, dict[str, np.ndarray] | Failure] = {}

    def embeddings(self, path: Path) -> dict[str, np.ndarray] | Failure:
        path = Path(path)
        if path not in self._cache:
            r = _analyse(self.pipeline, path)
            self._cache[path] = r if isinstance(r, Failure) else r.embeddings
        return self._cache[path]

    def enroll(self, paths: Sequence[Path]) -> dict[str, np.ndarray] | Failure:
        embs = [self.embeddings(p) for p in paths]
        good = [e for e in embs if not isinstance(e, Failure)]
        if not good:
            return next(e for e in embs if isinstance(e, Failure))
        return {name: l2_normalise(np.mean([e[name] for e in good], axis=0)[None])[0] for name in self.names}

    def score(self, handle: dict[str, np.ndarray], probe: Path) -> float | Failure:
        e = self.embeddings(probe)
        if isinstance(e, Failure):
            return e
        return float(np.mean([np.dot(handle[name], e[name]) for name in handle]))


class FacePadScorer:
    score_name = "p_bonafide"

    def __init__(self, pipeline: FacePipeline) -> None:
        self.pipeline = pipeline

    def score(self, path: Path) -> float | Failure:
        r = _analyse(self.pipeline, path, liveness=True, embed=False)
        return r if isinstance(r, Failure) else float(r.liveness)


def make_verification_scorer(options: ScorerOptions) -> FaceVerificationScorer:
    return FaceVerificationScorer(FacePipeline(pipeline_config(ModelStore(options.settings), liveness=())))


def make_pad_scorer(options: ScorerOptions) -> FacePadScorer:
    return FacePadScorer(FacePipeline(pipeline_config(ModelStore(options.settings))))
