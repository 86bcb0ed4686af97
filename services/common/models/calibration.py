"""Calibration records kept in the manifest: per model and per channel (a capture condition such as
"mobile-selfie" or "telephony-8k"), the decision thresholds and the score-to-LLR map measured on a
named dataset, with what that dataset can support.

For comparison models (face or speaker embedders) ``fmr`` is the false match rate and ``fnmr`` the
false non-match rate. For presentation-attack detectors (liveness, anti-spoofing; ``rate: APCER``)
read ``fmr`` as APCER (attacks accepted), ``fnmr`` as BPCER (bona fide presentations rejected),
"impostor" as attack presentations and "genuine" as bona fide ones. Scores are "higher means more
likely genuine / live" in every case.

Support (the rule of three): with no errors among N independent trials the one-sided 95 % upper
confidence bound on the error rate is about 3/N, so an operating point for a target rate p is
*supported* only when it was measured on at least ceil(3/p) impostor (attack) trials. Every point
records the trials it was measured on and whether they support it; a service refuses a point that
is unsupported (:class:`OperatingPointError`) instead of deciding on a threshold no data backs.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Annotated, Any, Literal, Mapping, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

UNSUPPORTED = "OPERATING_POINT_UNSUPPORTED"
MISSING = "OPERATING_POINT_MISSING"

# What a record's targets are rates of, and what its "impostor" trials are called in messages.
Rate = Literal["FMR", "APCER"]
_NEGATIVES = {"FMR": "impostor trials", "APCER": "attack presentations"}


def trials_needed(target: float) -> int:
    """Trials needed to support an error rate of ``target`` with zero errors (95 % upper bound)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target rate must be in (0, 1), got {target}")
    # round() first: 3 / 1e-4 is 29999.999999999996 in binary floating point.
    return math.ceil(round(3.0 / target, 6))


def rate_text(value: float) -> str:
    """1e-4 as "1e-4", 0.05 as "5e-2": how targets are named in messages."""
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def support_gap(rate: str, target: float, n_impostor: int) -> str:
    """Why ``n_impostor`` trials do not support ``target`` ("" when they do)."""
    needed = trials_needed(target)
    if n_impostor >= needed:
        return ""
    return (f"{rate} {rate_text(target)} needs >= {needed:,} {_NEGATIVES.get(rate, 'impostor trials')}, "
            f"the calibration has {n_impostor:,}")


def llr_caps(n_genuine: int, n_impostor: int) -> tuple[float, float]:
    """The most negative and most positive LLR that these trial counts can support.

    An LLR of L at a score claims that impostors reach it e^L times less often than genuine users.
    If none of N impostor trials did, the data bound the impostor rate only by about 3/N (rule of
    three, one-sided 95 %), while the genuine rate is at most 1: the data support a ratio of at most
    N/3, so L <= ln(N_impostor / 3). Symmetrically, evidence against a match is bounded by the
    genuine trials: L >= -ln(N_genuine / 3). With 3 or fewer trials of a class no evidence in that
    direction is supported (cap 0). This is the same rule that decides an operating point's support.
    """
    return -math.log(max(n_genuine, 3) / 3.0), math.log(max(n_impostor, 3) / 3.0)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrialCounts(_Strict):
    genuine: int = Field(ge=0)  # for attack detectors: bona fide presentations
    impostor: int = Field(ge=0)  # for attack detectors: attack presentations


class HeldOutCheck(_Strict):
    """The point's threshold measured on data the calibration never saw (other people, other
    attack instruments): what a decision there can truthfully claim."""

    dataset: str = Field(min_length=1)  # e.g. "fixtures/face/identities, the 59 people at odd positions"
    trials: TrialCounts  # scored trials of the check (genuine failures included in genuine)
    fmr: float = Field(ge=0, le=1)  # measured at the threshold (APCER for attack detectors)
    fmr_ci95: tuple[float, float]  # exact binomial interval, trials treated as independent
    fnmr: float = Field(ge=0, le=1)  # failures counted as non-matches (BPCER for attack detectors)
    consistent: bool  # the interval reaches down to the target
    date: dt.date | None = None
    notes: str = ""  # e.g. how many people pairs the false matches come from

    @model_validator(mode="after")
    def _interval(self) -> "HeldOutCheck":
        lo, hi = self.fmr_ci95
        if not 0 <= lo <= self.fmr <= hi <= 1:
            raise ValueError(f"fmr_ci95 {self.fmr_ci95} must hold fmr {self.fmr} within [0, 1]")
        return self


class OperatingPoint(_Strict):
    target_fmr: float = Field(gt=0, lt=1)  # the record's rate (FMR or APCER)
    threshold: float  # accept when score >= threshold
    fmr: float | None = Field(default=None, ge=0, le=1)  # measured at the threshold
    fnmr: float | None = Field(default=None, ge=0, le=1)  # measured at the threshold
    trials: TrialCounts  # what fmr (impostor) and fnmr (genuine) were measured on
    supported: bool  # trials.impostor >= ceil(3 / target_fmr)
    why: str | None = None  # why not, when not supported
    held_out: HeldOutCheck | None = None  # the threshold checked on data the calibration never saw

    @model_validator(mode="after")
    def _consistency_follows_the_interval(self) -> "OperatingPoint":
        if self.held_out is not None and self.held_out.consistent != (self.held_out.fmr_ci95[0] <= self.target_fmr):
            raise ValueError(f"the held-out check of {rate_text(self.target_fmr)} says consistent="
                             f"{self.held_out.consistent}, its interval {self.held_out.fmr_ci95} says otherwise")
        return self

    @model_validator(mode="after")
    def _support_follows_the_counts(self) -> "OperatingPoint":
        needed = trials_needed(self.target_fmr)
        if self.supported and self.trials.impostor < needed:
            raise ValueError(
                f"the point for {rate_text(self.target_fmr)} is marked supported but was measured on "
                f"{self.trials.impostor:,} impostor (attack) trials; it needs >= {needed:,}"
            )
        if not self.supported and not (self.why or "").strip():
            raise ValueError(f"the point for {rate_text(self.target_fmr)} is unsupported: say why")
        return self


# The LLR range the calibration data support (see llr_caps); None: unknown, not clipped.
MinLLR = Annotated[float | None, Field(le=0)]
MaxLLR = Annotated[float | None, Field(ge=0)]


def _clipped(llr: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    return np.clip(llr, -np.inf if lo is None else lo, np.inf if hi is None else hi)


class LogisticLLR(_Strict):
    """LLR = a * score + b (linear logistic regression calibration), a > 0, clipped to the caps."""

    kind: Literal["logistic"] = "logistic"
    a: float = Field(gt=0)
    b: float
    min_llr: MinLLR = None
    max_llr: MaxLLR = None

    def llr(self, score: np.ndarray | float) -> np.ndarray:
        return _clipped(self.a * np.asarray(score, dtype=np.float64) + self.b, self.min_llr, self.max_llr)

    def one(self, score: float) -> float:
        """:meth:`llr` of one score, in Python floats: the same float64 operations, the same value, without
        numpy's per-call cost on a 0-d array (a service's every decision)."""
        lo = -math.inf if self.min_llr is None else self.min_llr
        hi = math.inf if self.max_llr is None else self.max_llr
        return min(max(self.a * float(score) + self.b, lo), hi)


class PavLLR(_Strict):
    """Pool-adjacent-violators calibration: piecewise-linear between the table's points, flat
    outside, clipped to the caps."""

    kind: Literal["pav"] = "pav"
    scores: list[float] = Field(min_length=2)
    llrs: list[float] = Field(min_length=2)
    min_llr: MinLLR = None
    max_llr: MaxLLR = None

    @model_validator(mode="after")
    def _monotone(self) -> "PavLLR":
        if len(self.scores) != len(self.llrs):
            raise ValueError(f"scores has {len(self.scores)} points but llrs has {len(self.llrs)}")
        if any(b <= a for a, b in pairwise(self.scores)):
            raise ValueError("scores must be strictly increasing")
        if any(b < a for a, b in pairwise(self.llrs)):
            raise ValueError("llrs must be non-decreasing (a PAV map is monotone)")
        return self

    def llr(self, score: np.ndarray | float) -> np.ndarray:
        llr = np.interp(np.asarray(score, dtype=np.float64), self.scores, self.llrs)
        return _clipped(llr, self.min_llr, self.max_llr)

    def one(self, score: float) -> float:
        return float(self.llr(score))


LLRMap = Annotated[Union[LogisticLLR, PavLLR], Field(discriminator="kind")]


class OperatingPointError(LookupError):
    """A decision asked for an operating point the calibration cannot back.

    ``reason``: OPERATING_POINT_MISSING (no point for the target) or OPERATING_POINT_UNSUPPORTED
    (measured on too few trials); services answer FAILED_PRECONDITION with it.
    """

    def __init__(self, message: str, reason: str, target: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.target = target

    def __str__(self) -> str:  # LookupError's default would be fine; KeyError's quoting is not
        return str(self.args[0])


@dataclass(frozen=True)
class Claim:
    """The error rate a decision at an operating point can truthfully state.

    ``rate``: the held-out measurement when the point has one (what other people / other attacks
    showed), else the calibration's own measurement at the threshold (in sample: optimistic).
    ``upper95``: the one-sided bound the trials support (the held-out interval's upper end; in
    sample, the larger of the rate and the rule-of-three bound 3/N).
    """

    target: float  # the point's target (what the configuration asked for)
    rate: float
    upper95: float
    trials: int  # impostor trials (attack presentations) behind the figure
    source: Literal["held_out", "calibration"]
    dataset: str
    consistent: bool | None  # held-out only: is the measurement consistent with the target?


def _same_target(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(1.0, b)


class CalibrationRecord(_Strict):
    dataset: str = Field(min_length=1)  # what was scored, e.g. "fixtures/faces v1 (LFW subset)"
    rate: Rate = "FMR"  # what target_fmr / fmr are: FMR (comparison) or APCER (attack detection)
    trials: TrialCounts  # all trials of the dataset
    operating_points: list[OperatingPoint] = Field(min_length=1)
    llr: LLRMap | None = None
    score: str = "cosine"  # what the threshold applies to, e.g. "cosine", "p_live", "p_bonafide"
    date: dt.date
    tool_version: str = Field(min_length=1)  # e.g. "biogate 0.1.0 services.common.evaluation"
    notes: str = ""

    @model_validator(mode="before")
    @classmethod
    def _complete_older_records(cls, data: Any) -> Any:
        """Records written before per-point counts, support flags and LLR caps existed: every point
        was measured on all of the record's trials (`biogate calibrate` always did so), so the
        point's counts are the record's, its support follows from them, and so do the caps."""
        if not isinstance(data, Mapping) or not isinstance(data.get("trials"), Mapping):
            return data
        trials = data["trials"]
        try:
            n_gen, n_imp = int(trials["genuine"]), int(trials["impostor"])
        except (KeyError, TypeError, ValueError):
            return data  # the field validation reports it
        rate = data.get("rate", "FMR")
        out = dict(data)
        points = []
        for p in data.get("operating_points") or ():
            if isinstance(p, Mapping) and "supported" not in p:
                p = {"trials": {"genuine": n_gen, "impostor": n_imp}, **p}
                target, counts = p.get("target_fmr"), p["trials"]
                if isinstance(target, (int, float)) and 0 < target < 1 and isinstance(counts, Mapping):
                    why = support_gap(rate, float(target), int(counts.get("impostor", 0)))
                    p |= {"supported": not why, "why": why or None}
            points.append(p)
        if points:
            out["operating_points"] = points
        llr = data.get("llr")
        if isinstance(llr, Mapping) and "min_llr" not in llr and "max_llr" not in llr:
            lo, hi = llr_caps(n_gen, n_imp)
            out["llr"] = {**llr, "min_llr": lo, "max_llr": hi}
        return out

    @model_validator(mode="after")
    def _consistent(self) -> "CalibrationRecord":
        targets = [p.target_fmr for p in self.operating_points]
        if len(set(targets)) != len(targets):
            raise ValueError(f"operating_points repeat a target_fmr: {targets}")
        for p in self.operating_points:
            if p.trials.genuine > self.trials.genuine or p.trials.impostor > self.trials.impostor:
                raise ValueError(f"the point for {rate_text(p.target_fmr)} counts more trials than the record")
        if self.llr is not None:
            lo, hi = llr_caps(self.trials.genuine, self.trials.impostor)
            if self.llr.max_llr is None or self.llr.max_llr > hi + 1e-9:
                raise ValueError(f"llr.max_llr must be at most ln({self.trials.impostor} / 3) = {hi:.4g}: "
                                 "the impostor trials support no more evidence for a match")
            if self.llr.min_llr is None or self.llr.min_llr < lo - 1e-9:
                raise ValueError(f"llr.min_llr must be at least -ln({self.trials.genuine} / 3) = {lo:.4g}: "
                                 "the genuine trials support no more evidence against a match")
        return self

    def point(self, target_fmr: float) -> OperatingPoint | None:
        return next((p for p in self.operating_points if _same_target(p.target_fmr, target_fmr)), None)

    def claim(self, target_fmr: float) -> Claim:
        """The FMR (APCER) a decision at the point for ``target_fmr`` can truthfully claim: its
        held-out check when there is one, else the calibration's own figure (see :class:`Claim`).
        :class:`OperatingPointError` for a point the record lacks."""
        point = self.point(target_fmr)
        if point is None:
            raise OperatingPointError(f"no operating point for {self.rate} {rate_text(target_fmr)}", MISSING,
                                      target_fmr)
        h = point.held_out
        if h is not None:
            return Claim(point.target_fmr, h.fmr, h.fmr_ci95[1], h.trials.impostor, "held_out", h.dataset,
                         h.consistent)
        n = point.trials.impostor
        measured = point.fmr if point.fmr is not None else point.target_fmr
        return Claim(point.target_fmr, measured, max(measured, 3.0 / n if n else 1.0), n, "calibration",
                     self.dataset, None)

    def threshold(self, target_fmr: float, *, model: str | None = None, channel: str | None = None) -> float:
        """The threshold of a supported point; :class:`OperatingPointError` otherwise.

        ``model`` and ``channel`` name the record in the message (a record does not know its place
        in the manifest).
        """
        where = f"{model} [{channel or 'default'}]: " if model else ""
        point = self.point(target_fmr)
        if point is None:
            known = ", ".join(
                rate_text(p.target_fmr) + ("" if p.supported else " (unsupported)") for p in self.operating_points
            )
            raise OperatingPointError(
                f"{where}no operating point for {self.rate} {rate_text(target_fmr)} (calibrated: {known}); "
                "re-calibrate with that target or choose a calibrated one", MISSING, target_fmr)
        if not point.supported:
            supported = sorted(p.target_fmr for p in self.operating_points if p.supported)
            # The nearest supported target at or above the one asked for, else the closest below it.
            nearest = next((t for t in supported if t >= target_fmr), supported[-1] if supported else None)
            advice = "re-calibrate on more data" + (f" or choose {rate_text(nearest)}" if nearest else "")
            raise OperatingPointError(f"{where}{point.why}; {advice}", UNSUPPORTED, target_fmr)
        return point.threshold
