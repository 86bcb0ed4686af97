"""Calibration records kept in the manifest: per model and per channel (a capture condition such as
"mobile-selfie" or "telephony-8k"), the decision thresholds and the score-to-LLR map measured on a
named dataset.

For comparison models (face or speaker embedders) ``fmr`` is the false match rate and ``fnmr`` the
false non-match rate. For presentation-attack detectors (liveness, anti-spoofing) read ``fmr`` as
APCER (attacks accepted) and ``fnmr`` as BPCER (bona fide presentations rejected). Scores are
"higher means more likely genuine / live" in every case.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OperatingPoint(_Strict):
    target_fmr: float = Field(gt=0, lt=1)
    threshold: float  # accept when score >= threshold
    fmr: float | None = Field(default=None, ge=0, le=1)  # measured at the threshold
    fnmr: float | None = Field(default=None, ge=0, le=1)  # measured at the threshold


class LogisticLLR(_Strict):
    """LLR = a * score + b (linear logistic regression calibration); a > 0."""

    kind: Literal["logistic"] = "logistic"
    a: float = Field(gt=0)
    b: float

    def llr(self, score: np.ndarray | float) -> np.ndarray:
        return self.a * np.asarray(score, dtype=np.float64) + self.b


class PavLLR(_Strict):
    """Pool-adjacent-violators calibration: piecewise-linear between the table's points, flat outside."""

    kind: Literal["pav"] = "pav"
    scores: list[float] = Field(min_length=2)
    llrs: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _monotone(self) -> "PavLLR":
        if len(self.scores) != len(self.llrs):
            raise ValueError(f"scores has {len(self.scores)} points but llrs has {len(self.llrs)}")
        if any(b <= a for a, b in zip(self.scores, self.scores[1:])):
            raise ValueError("scores must be strictly increasing")
        if any(b < a for a, b in zip(self.llrs, self.llrs[1:])):
            raise ValueError("llrs must be non-decreasing (a PAV map is monotone)")
        return self

    def llr(self, score: np.ndarray | float) -> np.ndarray:
        return np.interp(np.asarray(score, dtype=np.float64), self.scores, self.llrs)


LLRMap = Annotated[Union[LogisticLLR, PavLLR], Field(discriminator="kind")]


class TrialCounts(_Strict):
    genuine: int = Field(ge=0)  # for attack detectors: bona fide presentations
    impostor: int = Field(ge=0)  # for attack detectors: attack presentations


class CalibrationRecord(_Strict):
    dataset: str = Field(min_length=1)  # what was scored, e.g. "fixtures/faces v1 (LFW subset)"
    trials: TrialCounts
    operating_points: list[OperatingPoint] = Field(min_length=1)
    llr: LLRMap | None = None
    score: str = "cosine"  # what the threshold applies to, e.g. "cosine", "p_live", "p_bonafide"
    date: dt.date
    tool_version: str = Field(min_length=1)  # e.g. "biogate 0.1.0 services.common.evaluation"
    notes: str = ""

    @model_validator(mode="after")
    def _distinct_targets(self) -> "CalibrationRecord":
        targets = [p.target_fmr for p in self.operating_points]
        if len(set(targets)) != len(targets):
            raise ValueError(f"operating_points repeat a target_fmr: {targets}")
        return self

    def threshold(self, target_fmr: float) -> float:
        for point in self.operating_points:
            if abs(point.target_fmr - target_fmr) <= 1e-12 * max(1.0, target_fmr):
                return point.threshold
        known = ", ".join(str(p.target_fmr) for p in self.operating_points)
        raise KeyError(f"no operating point for target FMR {target_fmr} (calibrated: {known})")
