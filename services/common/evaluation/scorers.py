"""The scorer interface the evaluation runs over, and the registry services add their scorers to.

A service provides a factory ``factory(options: ScorerOptions) -> VerificationScorer | PadScorer``
and registers it with :func:`register_scorer` when its module is imported. Common code never
imports a service; the CLI imports the service modules named in its table (see ``cli.py``).

Scorers return :class:`Failure` for a sample they cannot process (no face found, speech too
short...): the evaluation counts it as a failure to enrol or to acquire. Exceptions are bugs
and stop the evaluation.

A scorer that decides like the product (a local scorer at the calibrated thresholds, or the
running service through ``--target``) returns :class:`Scored`: the comparison (or PAD) score when
there is one, and the whole :class:`Decision`: accepted or not, and the first layer that refused
(``comparison``, ``liveness``, ``synthetic_speech``, ``replay``, ``challenge``...). A scorer that
only decides (the face service's CheckLiveness) returns a Scored without a score: its report then
gives the decision's error rates and no EER or DET, which binary decisions cannot give.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence, Union, runtime_checkable

from services.common.config import CommonSettings

Mode = Literal["local", "remote"]


@dataclass(frozen=True)
class Failure:
    # A coarse code such as "no_face" or "too_short"; never biometric data.
    reason: str
    layer: str = "acquisition"  # the layer that refused the sample: a non-response of the system


@dataclass(frozen=True)
class Decision:
    """The system's decision on one trial or presentation, every layer included."""

    accepted: bool
    refused_by: str = ""  # the first layer that refused, in the system's order; "" when accepted
    reasons: tuple[str, ...] = ()  # the system's reason codes, e.g. ("NO_MATCH", "SPOOF_SUSPECTED")
    layers: tuple[tuple[str, bool], ...] = ()  # (layer, passed) for each layer checked, in order

    def __post_init__(self) -> None:
        if self.accepted == bool(self.refused_by):
            raise ValueError("a decision is accepted exactly when no layer refused it")

    @classmethod
    def of_layers(cls, layers: Sequence[tuple[str, bool]], reasons: Sequence[str] = ()) -> "Decision":
        """Accepted when every checked layer passed; refused by the first that did not."""
        failed = next((name for name, passed in layers if not passed), "")
        return cls(not failed, failed, tuple(reasons), tuple((n, bool(p)) for n, p in layers))


@dataclass(frozen=True)
class Scored:
    """A score (None: the system gave none) with the system's decision."""

    score: float | None
    decision: Decision | None = None


@runtime_checkable
class VerificationScorer(Protocol):
    """Comparison: higher scores = more similar. ``score_name`` (e.g. "cosine") is optional."""

    def enroll(self, paths: Sequence[Path]) -> Any | Failure:
        """A reference (any opaque handle) from one or more samples of one person."""

    def score(self, handle: Any, probe: Path) -> float | Scored | Failure:
        """Compare a probe sample with an enrolled reference."""


@runtime_checkable
class PadScorer(Protocol):
    """Presentation attack detection: higher scores = more likely bona fide."""

    def score(self, path: Path) -> float | Scored | Failure: ...


Scorer = Union[VerificationScorer, PadScorer]


@dataclass(frozen=True)
class ScorerOptions:
    settings: CommonSettings
    channel: str | None = None  # capture condition, e.g. "mobile-selfie", "telephony-8k"
    target: str | None = None  # host:port of a running service, for remote scorers
    tenant: str | None = None  # remote scorers: the tenant whose policy applies (None: the scorer's own)
    decide: bool = True  # local scorers: decide at the calibrated thresholds as the service does

    def remote_target(self) -> str:
        """The host:port a remote scorer talks to."""
        if not self.target:
            raise ValueError("a remote scorer needs the target service's host:port (--target)")
        return self.target


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
