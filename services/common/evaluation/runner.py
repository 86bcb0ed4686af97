"""Run a scorer over a trial list, keeping every score and every failure for the metrics."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from .metrics import FailureRate, FloatArray, failure_rate, split_by_type
from .scorers import Decision, Failure, PadScorer, Scored, VerificationScorer
from .trials import PadSample, VerificationTrial

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Stage = Literal["enrol", "probe"]


def _checked(value: Any, who: str) -> Scored | Failure:
    if isinstance(value, Failure):
        return value
    scored = value if isinstance(value, Scored) else Scored(value)
    if scored.score is None:
        if scored.decision is None:
            raise ValueError(f"{who} returned neither a score nor a decision")
        return scored
    score = float(scored.score)
    if not math.isfinite(score):
        raise ValueError(f"{who} returned a non-finite score; return a Failure instead")
    return Scored(score, scored.decision)


@dataclass(frozen=True)
class TrialResult:
    trial: VerificationTrial
    score: float | None
    failure: Failure | None = None
    stage: Stage | None = None  # where it failed
    decision: Decision | None = None  # the system's decision, when the scorer decides


class _Outcomes:
    """What a run's results carry: scores, the system's decisions, or both."""

    results: list

    @property
    def has_scores(self) -> bool:
        return any(r.score is not None for r in self.results)

    @property
    def has_decisions(self) -> bool:
        return any(r.decision is not None for r in self.results)


@dataclass(frozen=True)
class VerificationRun(_Outcomes):
    results: list[TrialResult]
    enrolments: FailureRate  # FTE: over distinct enrolments (sets of enrolment files)

    def of_kind(self, kind: str) -> list[TrialResult]:
        """The results of ``target``, ``nontarget`` (zero-effort impostor) or ``spoof`` trials."""
        return [r for r in self.results if r.trial.kind == kind]

    def _scores(self, kind: str) -> FloatArray:
        return np.asarray([r.score for r in self.of_kind(kind) if r.score is not None], dtype=np.float64)

    @property
    def genuine(self) -> FloatArray:
        return self._scores("target")

    @property
    def impostor(self) -> FloatArray:
        """Zero-effort impostor scores: spoofed probes are kept apart (:attr:`spoofs`)."""
        return self._scores("nontarget")

    @property
    def spoofs(self) -> dict[str, FloatArray]:
        """Scores of the spoofed probes that got one, by attack type."""
        scored = [(r.score, r.trial.attack_type) for r in self.of_kind("spoof") if r.score is not None]
        return split_by_type([s for s, _ in scored], [t for _, t in scored])

    @property
    def attack_types(self) -> list[str]:
        return sorted({r.trial.attack_type for r in self.of_kind("spoof")})

    def _failures(self, target: bool) -> int:
        return sum(1 for r in self.of_kind("target" if target else "nontarget") if r.failure is not None)

    @property
    def genuine_failures(self) -> int:
        return self._failures(True)

    @property
    def impostor_failures(self) -> int:
        return self._failures(False)

    @property
    def fte(self) -> FailureRate:
        return self.enrolments

    @property
    def fta(self) -> FailureRate:
        """Failed probes over probe attempts (trials whose enrolment succeeded)."""
        attempted = [r for r in self.results if r.stage != "enrol"]
        return failure_rate(sum(1 for r in attempted if r.stage == "probe"), len(attempted))

    @property
    def trials_failed_at_enrolment(self) -> int:
        return sum(1 for r in self.results if r.stage == "enrol")

    @property
    def failure_reasons(self) -> dict[str, int]:
        c = Counter(f"{r.stage}:{r.failure.reason}" for r in self.results if r.failure)
        return dict(sorted(c.items()))


def run_verification(
    scorer: VerificationScorer,
    trials: Sequence[VerificationTrial],
    progress: Progress | None = None,
) -> VerificationRun:
    """Score every trial; each distinct enrolment is made once and reused."""
    if not trials:
        raise ValueError("no trials to run")
    handles: dict[tuple[Path, ...], Any] = {}
    results = []
    for n, trial in enumerate(trials, start=1):
        if trial.enroll not in handles:
            handles[trial.enroll] = scorer.enroll(list(trial.enroll))
        handle = handles[trial.enroll]
        if isinstance(handle, Failure):
            results.append(TrialResult(trial, None, handle, "enrol"))
        else:
            out = _checked(scorer.score(handle, trial.probe), "VerificationScorer.score")
            if isinstance(out, Failure):
                results.append(TrialResult(trial, None, out, "probe"))
            else:
                results.append(TrialResult(trial, out.score, decision=out.decision))
        if progress:
            progress(n, len(trials))
    enrol_failures = sum(1 for h in handles.values() if isinstance(h, Failure))
    run = VerificationRun(results, failure_rate(enrol_failures, len(handles)))
    log.info(
        "verification run: %d trials, %d enrolments (%d failed), %d probe failures",
        len(results), len(handles), enrol_failures, run.fta.failures,
    )
    return run


@dataclass(frozen=True)
class PadResult:
    sample: PadSample
    score: float | None
    failure: Failure | None = None
    decision: Decision | None = None  # the system's decision, when the scorer decides


@dataclass(frozen=True)
class PadRun(_Outcomes):
    results: list[PadResult]

    @property
    def bonafide(self) -> FloatArray:
        return np.asarray(
            [r.score for r in self.results if r.sample.bonafide and r.score is not None],
            dtype=np.float64,
        )

    @property
    def attacks(self) -> dict[str, FloatArray]:
        """Scores of the attack presentations that got a response, by attack type."""
        scored = [(r.score, r.sample.attack_type) for r in self.results if not r.sample.bonafide and r.score is not None]
        return split_by_type([s for s, _ in scored], [t for _, t in scored])

    @property
    def attack_types(self) -> list[str]:
        return sorted({r.sample.attack_type for r in self.results if not r.sample.bonafide})

    @property
    def bpnrr(self) -> FailureRate:
        b = [r for r in self.results if r.sample.bonafide]
        return failure_rate(sum(1 for r in b if r.failure), len(b))

    def apnrr(self, attack_type: str | None = None) -> FailureRate:
        a = [
            r
            for r in self.results
            if not r.sample.bonafide and attack_type in (None, r.sample.attack_type)
        ]
        return failure_rate(sum(1 for r in a if r.failure), len(a))

    @property
    def failure_reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(r.failure.reason for r in self.results if r.failure).items()))


def run_pad(
    scorer: PadScorer, samples: Sequence[PadSample], progress: Progress | None = None
) -> PadRun:
    if not samples:
        raise ValueError("no presentations to run")
    results = []
    for n, sample in enumerate(samples, start=1):
        out = _checked(scorer.score(sample.path), "PadScorer.score")
        if isinstance(out, Failure):
            results.append(PadResult(sample, None, out))
        else:
            results.append(PadResult(sample, out.score, decision=out.decision))
        if progress:
            progress(n, len(samples))
    run = PadRun(results)
    log.info("PAD run: %d presentations, %d without a response", len(results), sum(
        1 for r in results if r.failure))
    return run
