"""PNG plots for evaluation reports: DET curves on normal-deviate axes and score histograms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import ArrayLike  # noqa: E402
from scipy.stats import norm  # noqa: E402

from .metrics import DetCurve  # noqa: E402

_LONG_NAMES = {
    "FMR": "False match rate (FMR)",
    "FNMR": "False non-match rate (FNMR)",
    "APCER": "Attack presentation classification error rate (APCER)",
    "BPCER": "Bona fide presentation classification error rate (BPCER)",
}
_TICKS = (1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 0.999)


@dataclass(frozen=True)
class MarkedPoint:
    label: str
    x: float  # FMR (or APCER)
    y: float  # FNMR (or BPCER)
    threshold: float | None = None


def _tick_label(p: float) -> str:
    return f"{p * 100:g}%"


def plot_det(
    curves: Sequence[tuple[str, DetCurve]],
    out_path: str | Path,
    points: Sequence[MarkedPoint] = (),
    title: str = "DET curve",
    x_name: str = "FMR",
    y_name: str = "FNMR",
) -> Path:
    """DET curves on probit axes. Rates of 0 or 1 (infinitely far out) are drawn at half a
    trial from the end, 0.5/N or 1 - 0.5/N, with N the trials behind that rate."""
    if not curves:
        raise ValueError("plot_det: no curves")
    floor = min(0.5 / max(c.n_impostor, c.n_genuine) for _, c in curves)
    fig, ax = plt.subplots(figsize=(6.4, 6.0), dpi=110)
    for label, c in curves:
        fx = np.clip(c.fmr, 0.5 / c.n_impostor, 1 - 0.5 / c.n_impostor)
        fy = np.clip(c.fnmr, 0.5 / c.n_genuine, 1 - 0.5 / c.n_genuine)
        # Consecutive points differ in one rate only (both at tied scores): straight segments
        # between them are the exact staircase.
        ax.plot(norm.ppf(fx), norm.ppf(fy), label=label, linewidth=1.6)
    lo, hi = norm.ppf(floor), norm.ppf(1 - floor)
    ax.plot([lo, hi], [lo, hi], color="0.7", linewidth=0.8, linestyle=":", label=f"{x_name} = {y_name}")
    for p in points:
        px = norm.ppf(np.clip(p.x, floor, 1 - floor))
        py = norm.ppf(np.clip(p.y, floor, 1 - floor))
        text = f"{p.label}: {x_name} {p.x:.2%}, {y_name} {p.y:.2%}"
        if p.threshold is not None:
            text += f"\nthreshold {p.threshold:.4g}"
        ax.plot(px, py, marker="o", markersize=8, markerfacecolor="none", markeredgewidth=2,
                linestyle="none", label=text)
        ax.annotate(p.label, (px, py), textcoords="offset points", xytext=(8, 8), fontsize=9)
    ticks = [t for t in _TICKS if floor * 0.999 <= t <= 1 - floor * 0.999] or [0.5]
    ax.set_xticks(norm.ppf(ticks), [_tick_label(t) for t in ticks])
    ax.set_yticks(norm.ppf(ticks), [_tick_label(t) for t in ticks])
    ax.set_xlim(lo - 0.1, hi + 0.1)
    ax.set_ylim(lo - 0.1, hi + 0.1)
    ax.set_xlabel(_LONG_NAMES.get(x_name, x_name))
    ax.set_ylabel(_LONG_NAMES.get(y_name, y_name))
    ax.set_title(title)
    ax.grid(True, linewidth=0.5, alpha=0.5)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out_path)


def plot_histograms(
    groups: Mapping[str, ArrayLike],
    out_path: str | Path,
    threshold: float | None = None,
    title: str = "Score distributions",
    xlabel: str = "score",
    bins: int = 40,
) -> Path:
    """Overlaid density histograms, one per group (e.g. genuine / impostor, or bona fide and
    each attack type), with the decision threshold as a vertical line."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in groups.items()}
    arrays = {k: v for k, v in arrays.items() if v.size}
    if not arrays:
        raise ValueError("plot_histograms: no scores")
    allv = np.concatenate(list(arrays.values()))
    lo, hi = float(allv.min()), float(allv.max())
    if threshold is not None and np.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    for label, v in arrays.items():
        ax.hist(v, bins=edges.tolist(), density=True, alpha=0.45, label=f"{label} (n={v.size})",
                histtype="stepfilled", edgecolor="black", linewidth=0.4)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="crimson", linestyle="--", linewidth=1.5,
                   label=f"threshold {threshold:.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def _save(fig: plt.Figure, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
