"""Score calibration: thresholds for target FMRs and score -> log-likelihood-ratio maps.

A calibration *record* is a plain dict in the shape of the model manifest's ``calibration``
section (``services.common.models.calibration.CalibrationRecord``, one per model and channel)::

    {
      "dataset": "fixtures/trials_face.csv",
      "rate": "FMR",                            # "APCER" for presentation-attack detectors
      "trials": {"genuine": 100, "impostor": 157},
      "operating_points": [                     # accept when score >= threshold
        {"target_fmr": 0.01, "threshold": 0.4123, "fmr": 0.0064, "fnmr": 0.03,
         "trials": {"genuine": 100, "impostor": 157},        # what the point was measured on
         "supported": False,                                 # rule of three: >= ceil(3 / target)
         "why": "FMR 1e-2 needs >= 300 impostor trials, the calibration has 157"},
      ],
      "llr": {"kind": "logistic", "a": 12.1, "b": -4.2,     # LLR = a * score + b, natural log,
              "min_llr": -3.5, "max_llr": 3.96},            # clipped to what the trials support
          # or {"kind": "pav", "scores": [...], "llrs": [...], ...}: linear interpolation between
          #    the table's points, constant beyond its ends
      "score": "cosine",
      "date": "2025-01-31",
      "tool_version": "biogate calibrate 0.1.0",
    }

For presentation-attack detectors the same shape holds with FMR read as APCER (the strict
maximum over attack types) and FNMR as BPCER; "genuine" counts bona fide presentations and
"impostor" attack presentations (all types pooled, for support too).
Thresholds follow :mod:`.metrics`: a match is ``score >= threshold``.
"""

from __future__ import annotations

import datetime as _dt
import math
from importlib import metadata
from typing import Any, Iterable, Mapping

import numpy as np
from numpy.typing import ArrayLike

from services.common.models.calibration import CalibrationRecord, llr_caps, support_gap

from .metrics import FloatArray, as_scores, error_rates, threshold_at_rate

LLR_KINDS = ("logistic", "pav")


def fit_thresholds(
    impostor: ArrayLike | Mapping[str, ArrayLike], target_fmrs: Iterable[float]
) -> dict[float, float]:
    """For each target FMR, the lowest threshold whose FMR does not exceed it.

    ``impostor`` may be a mapping of attack type -> scores: then every type's rate must stay
    within the target (APCER_max, ISO/IEC 30107-3).
    """
    groups = impostor if isinstance(impostor, Mapping) else {"": impostor}
    if not groups:
        raise ValueError("impostor: no attack types")
    arrays = [as_scores(v, f"impostor[{k!r}]" if k else "impostor") for k, v in groups.items()]
    out = {}
    for t in target_fmrs:
        if not 0.0 < t < 1.0:
            raise ValueError(f"target FMR must be in (0, 1), got {t}")
        out[float(t)] = max(threshold_at_rate(a, t) for a in arrays)
    return out


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _prior_weights(n_genuine: int, n_impostor: int, prior: float) -> tuple[float, float]:
    """Per-trial weights giving the classes total weights prior * N and (1 - prior) * N."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    n = n_genuine + n_impostor
    return prior * n / n_genuine, (1.0 - prior) * n / n_impostor


def fit_logistic(
    genuine: ArrayLike, impostor: ArrayLike, prior: float = 0.5, C: float = 1e4
) -> dict[str, Any]:
    """Linear LLR map by prior-weighted logistic regression: LLR = a * score + b.

    The classes are weighted so that the effective target prior is ``prior``; the prior log odds
    are then subtracted from the fitted log odds, leaving a likelihood ratio. The targets are
    Platt's (1999) smoothed labels, (N_genuine + 1) / (N_genuine + 2) and 1 / (N_impostor + 2),
    instead of 1 and 0: a posterior of exactly 1 or 0 is a claim no finite set of trials makes, and
    with hard labels separable scores drive the slope towards infinity (every in-sample score then
    saturates at the largest LLR allowed). With them the optimum is finite even on separable data,
    and a trial of each class moves it as much as one pseudo-trial does. Scores are standardised
    before fitting; the L2 penalty ``C`` is weak and only guards the solver.
    """
    g, i = as_scores(genuine, "genuine"), as_scores(impostor, "impostor")
    x = np.concatenate([g, i])
    wg, wi = _prior_weights(g.size, i.size, prior)
    mu, sd = float(x.mean()), float(x.std())
    if np.ptp(x) == 0.0:
        # Every score identical: the scores carry no evidence.
        return {"kind": "logistic", "a": 0.0, "b": 0.0}
    from sklearn.linear_model import LogisticRegression  # fitting only: services apply records without it

    # Soft labels as two weighted copies of every trial: (x, 1) with weight w*t and (x, 0) with w*(1-t).
    tg, ti = (g.size + 1.0) / (g.size + 2.0), 1.0 / (i.size + 2.0)
    t = np.concatenate([np.full(g.size, tg), np.full(i.size, ti)])
    w = np.concatenate([np.full(g.size, wg), np.full(i.size, wi)])
    z = ((x - mu) / sd).reshape(-1, 1)
    model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000)
    model.fit(np.concatenate([z, z]), np.concatenate([np.ones(x.size), np.zeros(x.size)]),
              sample_weight=np.concatenate([w * t, w * (1.0 - t)]))
    a_z, c_z = float(model.coef_[0, 0]), float(model.intercept_[0])
    a = a_z / sd
    b = c_z - a_z * mu / sd - _logit(prior)
    return {"kind": "logistic", "a": a, "b": b}


def _pav_levels(
    genuine: FloatArray, impostor: FloatArray, prior: float
) -> tuple[FloatArray, FloatArray]:
    """Distinct training scores (ascending) and their PAV posterior at ``prior``."""
    x = np.concatenate([genuine, impostor])
    y = np.concatenate([np.ones(genuine.size), np.zeros(impostor.size)])
    wg, wi = _prior_weights(genuine.size, impostor.size, prior)
    w = np.concatenate([np.full(genuine.size, wg), np.full(impostor.size, wi)])
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(x, y, sample_weight=w)
    xs = np.unique(x)
    return xs, np.clip(iso.predict(xs), 0.0, 1.0)


def _posterior_to_llr(p: FloatArray, prior: float) -> FloatArray:
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p) - _logit(prior)


def fit_pav(genuine: ArrayLike, impostor: ArrayLike, prior: float = 0.5) -> dict[str, Any]:
    """Non-parametric LLR map by pool-adjacent-violators (isotonic regression), as a table.

    The table keeps the first and last score of every PAV bin. Bins holding one class only would
    have infinite LLRs; every LLR is clipped to what the trials support (``llr_caps``:
    -ln(N_genuine / 3) .. +ln(N_impostor / 3)).
    """
    g, i = as_scores(genuine, "genuine"), as_scores(impostor, "impostor")
    xs, p = _pav_levels(g, i, prior)
    lo, hi = llr_caps(g.size, i.size)
    llr = np.clip(_posterior_to_llr(p, prior), lo, hi)
    keep = np.ones(xs.size, dtype=bool)
    # Drop points strictly inside a run of equal LLRs: interpolation over them changes nothing.
    keep[1:-1] = ~((llr[1:-1] == llr[:-2]) & (llr[1:-1] == llr[2:]))
    return {"kind": "pav", "scores": xs[keep].tolist(), "llrs": llr[keep].tolist()}


def fit_llr(
    genuine: ArrayLike, impostor: ArrayLike, kind: str = "logistic", prior: float = 0.5
) -> dict[str, Any]:
    if kind == "logistic":
        return fit_logistic(genuine, impostor, prior)
    if kind == "pav":
        return fit_pav(genuine, impostor, prior)
    raise ValueError(f"unknown LLR map kind {kind!r}; expected one of {LLR_KINDS}")


def apply_llr(calibration: Mapping[str, Any], score: ArrayLike) -> Any:
    """LLR (natural log) of ``score`` under a calibration record or its ``llr`` map, clipped to
    the map's caps (a record's caps follow from its trial counts when it does not state them).

    Returns a float for a scalar score, an array for an array of scores.
    """
    m = calibration.get("llr") if "operating_points" in calibration else calibration
    if m is None:
        raise ValueError("the calibration record has no LLR map")
    if "operating_points" in calibration and "trials" in calibration:
        llr = CalibrationRecord.model_validate(calibration).llr
        if llr is None:
            raise ValueError("the calibration record has no LLR map")
        m = llr.model_dump()
    s = np.asarray(score, dtype=np.float64)
    kind = m.get("kind")
    if kind == "logistic":
        out = float(m["a"]) * s + float(m["b"])
    elif kind == "pav":
        xs = np.asarray(m["scores"], dtype=np.float64)
        ys = np.asarray(m["llrs"], dtype=np.float64)
        if xs.size == 0 or xs.size != ys.size or np.any(np.diff(xs) < 0):
            raise ValueError("pav map: 'scores' must be non-empty, ascending, as long as 'llrs'")
        out = np.interp(s, xs, ys)
    else:
        raise ValueError(f"unknown LLR map kind {kind!r}; expected one of {LLR_KINDS}")
    lo, hi = m.get("min_llr"), m.get("max_llr")
    out = np.clip(out, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    return float(out) if out.ndim == 0 else out


def cllr(genuine_llr: ArrayLike, impostor_llr: ArrayLike) -> float:
    """Log-likelihood-ratio cost in bits (Brümmer): 0 is perfect, 1 is an LLR of 0 everywhere."""
    g = np.asarray(genuine_llr, dtype=np.float64).reshape(-1)
    i = np.asarray(impostor_llr, dtype=np.float64).reshape(-1)
    if g.size == 0 or i.size == 0:
        raise ValueError("cllr: both classes need at least one LLR")
    cost = np.mean(np.logaddexp(0.0, -g)) + np.mean(np.logaddexp(0.0, i))
    return float(cost / (2.0 * math.log(2.0)))


def min_cllr(genuine: ArrayLike, impostor: ArrayLike) -> float:
    """Cllr after the best monotone recalibration (PAV at prior 0.5, no clipping): discrimination only."""
    g, i = as_scores(genuine, "genuine"), as_scores(impostor, "impostor")
    xs, p = _pav_levels(g, i, 0.5)
    llr = _posterior_to_llr(p, 0.5)
    lookup = dict(zip(xs.tolist(), llr.tolist(), strict=True))
    return cllr([lookup[v] for v in g.tolist()], [lookup[v] for v in i.tolist()])


def tool_version() -> str:
    try:
        version = metadata.version("biogate")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"biogate calibrate {version}"


def calibration_record(
    genuine: ArrayLike,
    impostor: ArrayLike | Mapping[str, ArrayLike],
    *,
    target_fmrs: Iterable[float],
    dataset: str,
    llr_kind: str | None = "logistic",
    score_name: str = "cosine",
    prior: float = 0.5,
    genuine_failures: int = 0,
    date: _dt.date | None = None,
    rate: str | None = None,
) -> dict[str, Any]:
    """Fit thresholds (and an LLR map unless ``llr_kind`` is None) into a manifest record.

    ``impostor`` may map attack types to scores (PAD): the record's rate is then APCER. With
    ``rate="FMR"`` the mapping holds groups of impostor trials instead (e.g. read speech and digit
    answers), each of which must meet the target: the strictest sets the threshold, as for attack
    types, and a point is supported only when *every* group has the trials it needs. Failed
    genuine trials count in the FNMR reported for each operating point, not in the fits. Every
    point carries the trials it was measured on and whether they support its target; the LLR map
    carries the caps its trials support. Unsupported points are written too, marked: callers
    decide whether to keep them (``biogate calibrate`` refuses unless asked).
    """
    rate = rate or ("APCER" if isinstance(impostor, Mapping) else "FMR")
    groups = impostor if isinstance(impostor, Mapping) else {"": impostor}
    g = as_scores(genuine, "genuine")
    arrays = {k: as_scores(v, f"impostor[{k!r}]" if k else "impostor") for k, v in groups.items()}
    if not arrays:
        raise ValueError("impostor: no attack types")
    pooled = np.concatenate(list(arrays.values()))
    trials = {"genuine": int(g.size + genuine_failures), "impostor": int(pooled.size)}
    # APCER: attack types pooled for support (ISO/IEC 30107-3 practice); FMR groups: the smallest.
    support_name, support_n = ("", pooled.size) if rate == "APCER" or len(arrays) == 1 else \
        min(((k, a.size) for k, a in arrays.items()), key=lambda kv: kv[1])
    points = []
    for target, t in fit_thresholds(arrays, target_fmrs).items():
        fmr = max(float(np.count_nonzero(a >= t) / a.size) for a in arrays.values())
        fnmr = error_rates(g, pooled, t, genuine_failures).fnmr
        why = support_gap(rate, target, support_n)
        why = f"{support_name}: {why}" if why and support_name else why
        points.append({"target_fmr": target, "threshold": t, "fmr": fmr, "fnmr": fnmr, "trials": dict(trials),
                       "supported": not why, **({"why": why} if why else {})})
    record: dict[str, Any] = {"dataset": dataset, "rate": rate, "trials": trials, "operating_points": points}
    if llr_kind is not None:
        llr = fit_llr(g, pooled, llr_kind, prior)
        _check_llr_map(llr)
        lo, hi = llr_caps(g.size, pooled.size)
        record["llr"] = llr | {"min_llr": lo, "max_llr": hi}
    record |= {
        "score": score_name,
        "date": (date or _dt.date.today()).isoformat(),
        "tool_version": tool_version(),
    }
    return record


def _check_llr_map(llr: Mapping[str, Any]) -> None:
    # The manifest refuses maps that carry no evidence; say why here, where it is known.
    if llr["kind"] == "logistic" and not llr["a"] > 0:
        raise ValueError(
            f"fitted LLR slope a={llr['a']:.4g} is not positive: the scores do not rank genuine"
            " above impostor trials, so no LLR map can be calibrated from them"
        )
    if llr["kind"] == "pav" and len(llr["scores"]) < 2:
        raise ValueError("PAV map has a single point: every score is the same")


def threshold_for(record: Mapping[str, Any], target_fmr: float) -> float:
    """The record's threshold for ``target_fmr``; KeyError naming the calibrated targets if absent."""
    points = record["operating_points"]
    for p in points:
        if abs(p["target_fmr"] - target_fmr) <= 1e-12 * max(1.0, target_fmr):
            return float(p["threshold"])
    known = ", ".join(format(p["target_fmr"], "g") for p in points)
    raise KeyError(f"no operating point for target FMR {target_fmr:g} (calibrated: {known})")
