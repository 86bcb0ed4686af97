"""Factors in the style of privacyIDEA's token classes: one base class whose template method
runs the same steps for every factor, and one subclass per factor that fills in its own steps.
Policies stay apart (services.mfa.policy): a factor reads its settings, it does not decide.

    verify(ctx, evidence)        template method
      validate(ctx, evidence)    bad input -> INVALID_ARGUMENT / FAILED_PRECONDITION, before any state changes
      check(ctx, evidence)       the factor's own verification -> FactorOutcome
      (a biometric service that cannot answer -> an "unavailable" outcome, never a pass)
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from services.common.runtime import Runtime

from ..clients import BiometricClient, ServiceUnavailable
from ..fusion import FactorOutcome
from ..otp import OtpService
from ..policy.schema import Policy
from ..reasons import Reason

log = logging.getLogger("biogate.mfa.factors")


@dataclass
class FactorContext:
    rt: Runtime
    policy: Policy
    tenant: str
    subject: str
    session_id: str
    state: dict[str, Any]
    now: datetime
    clients: dict[str, BiometricClient]
    otp: OtpService
    budget_s: float | None = None  # what is left of the caller's deadline
    notes: dict[str, Any] = field(default_factory=dict)  # per-call facts a subclass reports (attempts left)


class Factor(ABC):
    name: ClassVar[str]

    def verify(self, ctx: FactorContext, evidence: Any) -> FactorOutcome:
        self.validate(ctx, evidence)
        try:
            return self.check(ctx, evidence)
        except ServiceUnavailable as exc:
            log.warning("factor service unavailable", extra={"factor": self.name, "why": exc.why})
            return FactorOutcome(self.name, False, unavailable=True,
                                 reasons=(Reason(f"{exc.service.upper()}_SERVICE_UNAVAILABLE", exc.why),))

    def validate(self, ctx: FactorContext, evidence: Any) -> None:
        """Hook: refuse malformed evidence (raise ServiceError)."""

    @abstractmethod
    def check(self, ctx: FactorContext, evidence: Any) -> FactorOutcome: ...
