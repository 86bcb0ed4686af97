"""The MFA's domain metrics: decisions, factor outcomes, and the circuit breakers towards face and
voice (the shared ones are in services/common/metrics.py)."""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

if TYPE_CHECKING:
    from services.mfa.clients import CircuitBreaker
    from services.mfa.fusion import FactorOutcome
    from services.mfa.reasons import Reason

DECISIONS = Counter("biogate_mfa_decisions_total",
                    "Decisions answered, by outcome and source (decide: Decide; review: a review's resolution "
                    "or expiry, the final decision of a session Decide sent to review)", ["outcome", "source"])
DECISION_REASONS = Counter("biogate_mfa_decision_reasons_total",
                           "Reasons the decisions gave, by outcome and reason code", ["outcome", "reason"])
FACTOR_OUTCOMES = Counter("biogate_mfa_factor_outcomes_total",
                          "Factor attempts evaluated, by factor and result "
                          "(passed, failed, veto, capture_error, unavailable)", ["factor", "result"])
BREAKER_STATE = Gauge("biogate_mfa_breaker_state",
                      "1 for the state the circuit breaker towards each biometric service is in, else 0",
                      ["service", "state"])
BREAKER_TRANSITIONS = Counter("biogate_mfa_breaker_transitions_total",
                              "Circuit breaker state changes, by service and the state entered", ["service", "state"])
CONFIG_ERRORS = Counter("biogate_mfa_client_config_errors_total",
                        "Calls a biometric service refused the MFA's credentials on", ["service", "code"])

BREAKER_STATES = ("closed", "open", "half_open")
_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def _code(code: str) -> str:
    """A reason code as a label value: codes are a fixed UPPER_SNAKE vocabulary; anything else
    (which would be a bug) is folded into OTHER rather than becoming a series of its own."""
    return code if _CODE.fullmatch(code) else "OTHER"


def record_decision(outcome: str, reasons: Iterable[Reason], source: str = "decide") -> None:
    DECISIONS.labels(outcome, source).inc()
    for r in reasons:
        DECISION_REASONS.labels(outcome, _code(r.code)).inc()


def factor_result(o: FactorOutcome) -> str:
    if o.passed:
        return "passed"
    if o.unavailable:
        return "unavailable"
    if o.capture_error:
        return "capture_error"
    return "veto" if o.veto else "failed"


def record_factors(outcomes: Iterable[FactorOutcome]) -> None:
    for o in outcomes:
        FACTOR_OUTCOMES.labels(o.factor, factor_result(o)).inc()


def watch_breaker(service: str, breaker: CircuitBreaker) -> None:
    """Exports ``breaker``'s state as read at scrape time (half-open begins by the clock alone);
    the latest breaker of a service is the one exported."""
    ref = weakref.ref(breaker)

    def is_in(state: str) -> Callable[[], float]:
        def read() -> float:
            b = ref()
            return float(b is not None and b.state == state)
        return read

    for state in BREAKER_STATES:
        BREAKER_STATE.labels(service, state).set_function(is_in(state))
