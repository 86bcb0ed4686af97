"""Factors in the style of privacyIDEA's token classes: one base class whose template methods
run the same steps for every factor, and one subclass per factor that fills in its own steps.
Policies stay apart (services.mfa.policy): a factor reads its settings, it does not decide.

    start_challenge(ctx)         what the user must answer in this session: an SMS code, a
                                 liveness move sequence, digits to speak (Orchestrator.challenge
                                 runs it for SendOtp and StartBiometricChallenge alike)
      claim(ctx, state)          hook, in the session's compare-and-swap before issuing: a
                                 resend cool-down checked and taken (release() gives it back)
      issue(ctx)                 the factor's own step -> Challenge
    validate(ctx, evidence)      bad input -> INVALID_ARGUMENT / FAILED_PRECONDITION, before any state
                                 changes (the orchestrator then charges the attempt to the lockout)
    evaluate(ctx, evidence)      template method
      check(ctx, evidence)       the factor's own verification -> FactorOutcome
      (a biometric service that cannot answer -> an "unavailable" outcome, never a pass)
    settle(ctx, state, evidence) hook, in the compare-and-swap recording the outcome
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from services.common import errors
from services.common.context import Principal
from services.common.runtime import Runtime

from ..clients import BiometricClient, ServiceUnavailable
from ..fusion import FactorOutcome
from ..otp import OtpService
from ..policy.schema import Policy
from ..proofs import Proofs
from ..reasons import Reason
from ..state import SessionState
from ..storage import MfaStore

log = logging.getLogger("biogate.mfa.factors")


@dataclass
class FactorContext:
    rt: Runtime
    store: MfaStore
    policy: Policy
    tenant: str
    subject: str
    session_id: str
    state: SessionState
    now: datetime
    clients: dict[str, BiometricClient]
    otp: OtpService
    budget_s: float | None = None  # what is left of the caller's deadline
    notes: dict[str, Any] = field(default_factory=dict)  # per-call facts a subclass reports (attempts left)
    proofs: Proofs | None = None  # capture bindings and device proofs
    also: list[FactorOutcome] = field(default_factory=list)  # further outcomes the evidence proved (a device key)
    caller: Principal = field(kw_only=True)  # the RPC's principal (a registered terminal submits terminal captures)


@dataclass(frozen=True)
class Challenge:
    response: Any  # what the RPC answers
    nonce: str | None = None  # kept in the session: evidence must answer a challenge it was given
    audit: tuple[str, dict[str, Any]] | None = None  # event type and details


class Factor(ABC):
    name: ClassVar[str]
    claims: ClassVar[bool] = False  # claim() changes the session before a challenge is issued

    # ------------------------------------------------------------------ challenges
    def start_challenge(self, ctx: FactorContext) -> Challenge:
        """Raises ServiceUnavailable when the factor's service cannot answer (the session then
        degrades), ServiceError for a refusal."""
        return self.issue(ctx)

    def claim(self, ctx: FactorContext, state: SessionState) -> None:  # noqa: B027  (optional hook)
        """Hook: reserve the challenge in ``state`` (re-run on a concurrent update); raise to refuse."""

    def release(self, ctx: FactorContext, state: SessionState, before: SessionState) -> None:  # noqa: B027  (optional hook)
        """Hook: undo claim() after the challenge could not be issued."""

    def issue(self, ctx: FactorContext) -> Challenge:
        raise errors.failed_precondition(f"the {self.name} factor has no challenge to start", "NO_CHALLENGE")

    # ------------------------------------------------------------------ evidence
    def evaluate(self, ctx: FactorContext, evidence: Any) -> FactorOutcome:
        """The outcome of evidence validate() accepted."""
        try:
            return self.check(ctx, evidence)
        except ServiceUnavailable as exc:
            log.warning("factor service unavailable", extra={"factor": self.name, "why": exc.why})
            return FactorOutcome(self.name, False, unavailable=True,
                                 reasons=(Reason(f"{exc.service.upper()}_SERVICE_UNAVAILABLE", exc.why),))

    def validate(self, ctx: FactorContext, evidence: Any) -> None:  # noqa: B027  (optional hook)
        """Hook: refuse malformed evidence (raise ServiceError)."""

    def settle(self, ctx: FactorContext, state: SessionState, evidence: Any) -> None:  # noqa: B027  (optional hook)
        """Hook, in the compare-and-swap that records the outcome: consume what the evidence
        answered (a push confirmation answers once); raise to refuse."""

    @abstractmethod
    def check(self, ctx: FactorContext, evidence: Any) -> FactorOutcome: ...
