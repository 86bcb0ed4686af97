"""Biometric error rates: verification (ISO/IEC 19795-1) and presentation attack detection (ISO/IEC 30107-3).

Conventions, used by every function here:

* Scores are "higher = more similar" (verification) or "higher = more bona fide" (PAD).
* Decision rule: a comparison is a **match** (a presentation is classified **bona fide**) when
  ``score >= threshold``. So FMR(t) = #{impostor >= t} / N_impostor and
  FNMR(t) = #{genuine < t} / N_genuine; tied scores fall on the accepting side.
* Failures (failure to enrol, failure to acquire) are passed as counts, never as NaN. A failed
  *genuine* trial counts as a non-match: it is in the FNMR numerator and denominator at every
  threshold (internally a score of -inf). A failed *impostor* trial can never false-match; it is
  left out of the FMR denominator, so that failures do not dilute the FMR and the thresholds fitted
  on the scored impostors give exactly the FMR reported. Failed impostor trials are still
  counted and reported (see :func:`failure_rate`).
* EER: the operating points are the step rates at every distinct finite score, plus the end points
  t = -inf (everything accepted) and t = +inf (nothing accepted). Walking up the thresholds, the
  first point with FNMR >= FMR is found; if FNMR == FMR there, that is the EER and its threshold.
  Otherwise the EER is where the straight segment between that point and the previous one (in
  (FMR, FNMR) space) crosses FMR == FNMR, and the threshold is interpolated linearly with the same
  weight (or the finite one of the two when the other is infinite). No step threshold achieves an
  interpolated EER exactly; the bracketing thresholds are returned too.
* FNMR at a target FMR: no interpolation. The threshold is the lowest one whose FMR does not exceed
  the target, i.e. just above (``numpy.nextafter``) the (k+1)-th highest impostor score, where
  k = floor(target * N_impostor); ties are never split.
* Supportability (rule of three): with zero false matches among N impostor trials, the one-sided
  95 % upper confidence bound on the FMR is about 3/N, so an FMR of p is supported only by at least
  ceil(3/p) scored impostor trials. The same rule applies per attack type to an APCER target.
* PAD (ISO/IEC 30107-3): APCER per attack type = proportion of that type's attack presentations
  classified bona fide; APCER_max is the maximum over types; BPCER = proportion of bona fide
  presentations classified as attacks. Presentations that got no response (the PAD subsystem could
  not process them) are reported as APNRR / BPNRR and are not part of APCER / BPCER. The PAD EER pools
  all attack types; BPCER at an APCER target uses the strict rule APCER_max <= target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.common.models.calibration import trials_needed

FloatArray = NDArray[np.float64]

DEFAULT_TARGET_FMRS: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
DEFAULT_TARGET_APCERS: tuple[float, ...] = (5e-2, 1e-2)


def as_scores(values: ArrayLike, name: str, allow_empty: bool = False) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name}: no scores (an error rate over an empty set is undefined)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: scores must be finite; pass failures as counts, not NaN/inf")
    return arr


def _with_failures(genuine: ArrayLike, genuine_failures: int, name: str = "genuine") -> FloatArray:
    """Genuine scores plus one -inf per failed genuine trial (a failure never matches)."""
    if genuine_failures < 0:
        raise ValueError(f"{name}_failures must be >= 0")
    g = as_scores(genuine, name, allow_empty=genuine_failures > 0)
    return np.concatenate([g, np.full(genuine_failures, -np.inf)])


def _count_at_or_above(sorted_scores: FloatArray, thresholds: FloatArray) -> NDArray[np.int64]:
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


rule_of_three = trials_needed  # the calibration records' support rule, one definition


def binomial_ci(errors: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) confidence interval of an error rate.

    It treats the trials as independent: all-pairs trials share people and images, so the true
    uncertainty is larger than this interval says.
    """
    from scipy.stats import binomtest

    if not 0 <= errors <= trials or trials == 0:
        raise ValueError(f"bad error count {errors} of {trials}")
    ci = binomtest(int(errors), int(trials)).proportion_ci(level, method="exact")
    return float(ci.low), float(ci.high)


# --------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class ErrorRates:
    threshold: float
    fmr: float
    fnmr: float


def error_rates(
    genuine: ArrayLike, impostor: ArrayLike, threshold: float, genuine_failures: int = 0
) -> ErrorRates:
    """FMR and FNMR at ``threshold`` (match when score >= threshold)."""
    g = _with_failures(genuine, genuine_failures)
    i = as_scores(impostor, "impostor")
    return ErrorRates(
        threshold=float(threshold),
        fmr=float(np.count_nonzero(i >= threshold) / i.size),
        fnmr=float(np.count_nonzero(g < threshold) / g.size),
    )


@dataclass(frozen=True)
class DetCurve:
    """Step operating points, thresholds ascending; FMR non-increasing, FNMR non-decreasing.

    The first point is t = -inf (all accepted), the last t = +inf (none accepted).
    """

    thresholds: FloatArray
    fmr: FloatArray
    fnmr: FloatArray
    n_genuine: int
    n_impostor: int


def det_curve(genuine: ArrayLike, impostor: ArrayLike, genuine_failures: int = 0) -> DetCurve:
    g = np.sort(_with_failures(genuine, genuine_failures))
    i = np.sort(as_scores(impostor, "impostor"))
    finite = np.unique(np.concatenate([g[np.isfinite(g)], i]))
    thresholds = np.concatenate([[-np.inf], finite, [np.inf]])
    fmr = _count_at_or_above(i, thresholds) / i.size
    # Divide counts (never 1 - x) so that equal rates are equal floats.
    fnmr = (g.size - _count_at_or_above(g, thresholds)) / g.size
    # At -inf every finite score is accepted but the failures (-inf) are not: they never match.
    fnmr[0] = genuine_failures / g.size
    fmr[-1] = 0.0
    fnmr[-1] = 1.0
    return DetCurve(thresholds, fmr.astype(np.float64), fnmr.astype(np.float64), g.size, i.size)


@dataclass(frozen=True)
class EerResult:
    eer: float
    threshold: float
    # The step operating points that bracket the crossing (equal when it falls on a point).
    lower: ErrorRates
    upper: ErrorRates


def _eer_from_curve(thresholds: FloatArray, fmr: FloatArray, fnmr: FloatArray) -> EerResult:
    d = fnmr - fmr
    # d[0] <= 0 (FMR is 1 at -inf) and d[-1] = 1, so a crossing always exists.
    i = int(np.argmax(d >= 0))
    point = ErrorRates(float(thresholds[i]), float(fmr[i]), float(fnmr[i]))
    if d[i] == 0 or i == 0:
        return EerResult(float(fmr[i]), float(thresholds[i]), point, point)
    prev = ErrorRates(float(thresholds[i - 1]), float(fmr[i - 1]), float(fnmr[i - 1]))
    alpha = -d[i - 1] / (d[i] - d[i - 1])
    eer = prev.fmr + alpha * (point.fmr - prev.fmr)
    t0, t1 = prev.threshold, point.threshold
    if math.isfinite(t0) and math.isfinite(t1):
        threshold = t0 + alpha * (t1 - t0)
    else:
        threshold = t1 if math.isfinite(t1) else t0
    return EerResult(float(eer), float(threshold), prev, point)


def eer(genuine: ArrayLike, impostor: ArrayLike, genuine_failures: int = 0) -> EerResult:
    """Equal error rate and its threshold (see the module docstring for the interpolation)."""
    c = det_curve(genuine, impostor, genuine_failures)
    return _eer_from_curve(c.thresholds, c.fmr, c.fnmr)


def threshold_at_rate(negatives: ArrayLike, target: float, name: str = "impostor") -> float:
    """Lowest threshold t with #{negatives >= t} / N <= target (ties are never split).

    Returns -inf when target >= 1 (every threshold qualifies).
    """
    if not 0.0 <= target:
        raise ValueError(f"target rate must be >= 0, got {target}")
    n = np.sort(as_scores(negatives, name))[::-1]
    allowed = math.floor(target * n.size + 1e-9)  # false accepts we may afford
    if allowed >= n.size:
        return float("-inf")
    # Just above the (allowed+1)-th highest score: it and every score tied with it are rejected.
    return float(np.nextafter(n[allowed], np.inf))


@dataclass(frozen=True)
class OperatingPoint:
    target: float
    threshold: float
    fmr: float
    fnmr: float
    n_impostor: int
    n_needed: int  # rule of three
    supported: bool


def fnmr_at_fmr(
    genuine: ArrayLike, impostor: ArrayLike, target_fmr: float, genuine_failures: int = 0
) -> OperatingPoint:
    """FNMR at the lowest threshold whose FMR does not exceed ``target_fmr``."""
    i = as_scores(impostor, "impostor")
    t = threshold_at_rate(i, target_fmr)
    rates = error_rates(genuine, i, t, genuine_failures)
    needed = rule_of_three(target_fmr)
    return OperatingPoint(
        target=float(target_fmr),
        threshold=t,
        fmr=rates.fmr,
        fnmr=rates.fnmr,
        n_impostor=int(i.size),
        n_needed=needed,
        supported=i.size >= needed,
    )


@dataclass(frozen=True)
class FailureRate:
    failures: int
    attempts: int

    @property
    def rate(self) -> float | None:
        return self.failures / self.attempts if self.attempts else None


def failure_rate(failures: int, attempts: int) -> FailureRate:
    """FTE (failed enrolments / enrolment attempts) or FTA (failed probes / probe attempts)."""
    if failures < 0 or attempts < 0 or failures > attempts:
        raise ValueError(f"bad failure count {failures} of {attempts}")
    return FailureRate(int(failures), int(attempts))


# --------------------------------------------------------------------------------------------
# Presentation attack detection


def _attack_arrays(attacks: Mapping[str, ArrayLike]) -> dict[str, FloatArray]:
    if not attacks:
        raise ValueError("attacks: no attack types")
    return {k: as_scores(v, f"attacks[{k!r}]") for k, v in sorted(attacks.items())}


@dataclass(frozen=True)
class PadRates:
    threshold: float
    apcer: dict[str, float]  # per attack type
    apcer_max: float
    bpcer: float


def pad_error_rates(
    bonafide: ArrayLike, attacks: Mapping[str, ArrayLike], threshold: float
) -> PadRates:
    """APCER per attack type, APCER_max and BPCER at ``threshold`` (bona fide when score >= t)."""
    b = as_scores(bonafide, "bonafide")
    a = _attack_arrays(attacks)
    apcer = {k: float(np.count_nonzero(v >= threshold) / v.size) for k, v in a.items()}
    return PadRates(
        threshold=float(threshold),
        apcer=apcer,
        apcer_max=max(apcer.values()),
        bpcer=float(np.count_nonzero(b < threshold) / b.size),
    )


def pad_eer(bonafide: ArrayLike, attacks: Mapping[str, ArrayLike]) -> EerResult:
    """EER between BPCER and the APCER of all attack types pooled (fields: fmr = APCER, fnmr = BPCER)."""
    pooled = np.concatenate(list(_attack_arrays(attacks).values()))
    return eer(bonafide, pooled)


@dataclass(frozen=True)
class PadOperatingPoint:
    target_apcer: float
    rates: PadRates
    n_attacks: dict[str, int]
    n_needed: int  # rule of three, per attack type
    supported: bool  # every attack type has at least n_needed presentations


def bpcer_at_apcer(
    bonafide: ArrayLike, attacks: Mapping[str, ArrayLike], target_apcer: float
) -> PadOperatingPoint:
    """BPCER at the lowest threshold where every attack type's APCER is <= ``target_apcer``."""
    a = _attack_arrays(attacks)
    t = max(threshold_at_rate(v, target_apcer, f"attacks[{k!r}]") for k, v in a.items())
    needed = rule_of_three(target_apcer)
    counts = {k: int(v.size) for k, v in a.items()}
    return PadOperatingPoint(
        target_apcer=float(target_apcer),
        rates=pad_error_rates(bonafide, a, t),
        n_attacks=counts,
        n_needed=needed,
        supported=all(n >= needed for n in counts.values()),
    )


def pad_eer_per_type(bonafide: ArrayLike, attacks: Mapping[str, ArrayLike]) -> dict[str, EerResult]:
    """The EER of each attack type against the bona fide presentations (fields as :func:`pad_eer`)."""
    return {k: eer(bonafide, v) for k, v in _attack_arrays(attacks).items()}


@dataclass(frozen=True)
class ApcerAtBpcer:
    target_bpcer: float
    rates: PadRates
    n_bonafide: int
    n_needed: int  # rule of three, bona fide presentations
    supported: bool


def apcer_at_bpcer(
    bonafide: ArrayLike, attacks: Mapping[str, ArrayLike], target_bpcer: float
) -> ApcerAtBpcer:
    """APCER of every attack type at the highest threshold whose BPCER does not exceed
    ``target_bpcer`` (the convenience-first operating point: how many attacks get through when
    at most that share of bona fide users is refused). Ties are never split."""
    b = as_scores(bonafide, "bonafide")
    if not 0.0 < target_bpcer < 1.0:
        raise ValueError(f"target BPCER must be in (0, 1), got {target_bpcer}")
    # Highest t with #{b < t} / N <= target: the (k+1)-th lowest bona fide score, k = floor(target N).
    k = math.floor(target_bpcer * b.size + 1e-9)
    t = float(np.sort(b)[k]) if k < b.size else float("inf")
    needed = rule_of_three(target_bpcer)
    return ApcerAtBpcer(float(target_bpcer), pad_error_rates(b, attacks, t), int(b.size), needed, b.size >= needed)


def non_response_rate(failures: int, presentations: int) -> FailureRate:
    """APNRR / BPNRR: presentations the PAD subsystem could not process, over all presented."""
    return failure_rate(failures, presentations)


def split_by_type(
    scores: Sequence[float], attack_types: Sequence[str]
) -> dict[str, FloatArray]:
    """Group attack scores by their attack type label."""
    if len(scores) != len(attack_types):
        raise ValueError("scores and attack_types differ in length")
    out: dict[str, list[float]] = {}
    for s, k in zip(scores, attack_types, strict=True):
        out.setdefault(k, []).append(s)
    return {k: np.asarray(v, dtype=np.float64) for k, v in sorted(out.items())}
