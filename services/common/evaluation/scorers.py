"""The scorer interface the evaluation runs over, and the registry services add their scorers to.

A service provides a factory ``factory(options: ScorerOptions) -> VerificationScorer | PadScorer``
and registers it with :func:`register_scorer` when its module is imported. Common code never
imports a service; the CLI imports the service modules named in its table (see ``cli.py``).

Scorers return :class:`Failure` for a sample they cannot process (no face found, speech too
short...): the evaluation counts it as a failure to enrol or to acquire. Exceptions are bugs
and stop the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence, Union, runtime_checkable

from services.common.config import Settings

Mode = Literal["local", "remote"]


@dataclass(frozen=True)
class Failure:
    # A coarse code such as "no_face" or "too_short"; never biometric data.
    reason: str


@runtime_checkable
class VerificationScorer(Protocol):
    """Comparison: higher scores = more similar. ``score_name`` (e.g. "cosine") is optional."""

    def enroll(self, paths: Sequence[Path]) -> Any | Failure:
        """A reference (any opaque handle) from one or more samples of one person."""

    def score(self, handle: Any, probe: Path) -> float | Failure:
        """Compare a probe sample with an enrolled reference."""


@runtime_checkable
class PadScorer(Protocol):
    """Presentation attack detection: higher scores = more likely bona fide."""

    def score(self, path: Path) -> float | Failure: ...


Scorer = Union[VerificationScorer, PadScorer]


@dataclass(frozen=True)
class ScorerOptions:
    settings: Settings
    channel: str | None = None  # capture condition, e.g. "mobile-selfie", "telephony-8k"
    target: str | None = None  # host:port of a running service, for remote scorers


ScorerFactory = Callable[[ScorerOptions], Scorer]

_REGISTRY: dict[tuple[str, str, Mode], ScorerFactory] = {}


def register_scorer(
    modality: str, task: str, factory: ScorerFactory, mode: Mode = "local"
) -> None:
    """Make ``factory`` the scorer for (modality, task); a later registration replaces it."""
    _REGISTRY[(modality, task, mode)] = factory


def get_scorer_factory(modality: str, task: str, mode: Mode = "local") -> ScorerFactory | None:
    return _REGISTRY.get((modality, task, mode))


def unregister_scorer(modality: str, task: str, mode: Mode = "local") -> None:
    _REGISTRY.pop((modality, task, mode), None)
