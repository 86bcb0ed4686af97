"""Fusion of factor evidence into a decision.

Evidence is in natural-log likelihood-ratio units. A biometric factor brings its calibrated LLR
(clipped, weighted); an OTP or device proof brings the fixed evidence its policy gives it. Per
factor the strongest attempt counts (attempts are bounded by the lockout). A liveness or spoof
failure is a veto: no amount of other evidence outweighs it. A biometric LLR at or below the
policy's ``deny_llr`` is strong evidence of another person and ends the session.

Independence (PSD2 RTS art. 9): each outcome names the authenticator that produced it; a device
key and the captures it signed are one authenticator, so a policy's ``min_independent`` counts
distinct authenticators among the passed factors, not factors.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .policy.schema import BIOMETRIC, POSSESSION, Policy
from .reasons import Reason, unique
from .risk import Assessment

AMR = {"face": "face", "voice": "vbm", "sms_otp": "sms", "device": "swk", "push": "swk"}  # RFC 8176 values
ACR_RANK = {"": 0, "aal1": 1, "aal2": 2}


@dataclass(frozen=True)
class FactorOutcome:
    factor: str
    passed: bool
    llr: float = 0.0  # evidence contributed (weighted, clipped)
    veto: bool = False  # liveness / spoof / replay failure
    deny: bool = False  # LLR at or below deny_llr
    unavailable: bool = False  # the service could not be reached: not an authentication failure
    liveness: bool = False  # presentation attack detection was applied (lockout weighs it lighter)
    reasons: tuple[Reason, ...] = ()
    capture_error: bool = False  # unusable sample (no face, too short): not counted as a failure
    binding: str = ""  # how a capture was bound, or a device proven: "device", "webauthn", "new_device", "terminal"
    authenticator: str = ""  # what produced it, for independence: "device:<id>", "sms", "terminal:<name>", ...
    # the operating point that decided (biometrics): target and measured FMR, and of the PAD layer APCER
    target_fmr: float | None = None
    measured_fmr: float | None = None
    target_apcer: float | None = None
    measured_apcer: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasons", unique(self.reasons))

    @property
    def counts_as_failure(self) -> bool:
        return not self.passed and not self.unavailable and not self.capture_error

    @property
    def source(self) -> str:
        return self.authenticator or self.factor

    def operating_point(self) -> dict[str, float]:
        names = {"fmr": self.target_fmr, "fmr_measured": self.measured_fmr, "apcer": self.target_apcer,
                 "apcer_measured": self.measured_apcer}
        return {k: v for k, v in names.items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        out = {"f": self.factor, "p": self.passed, "l": round(self.llr, 4), "v": self.veto, "d": self.deny,
               "u": self.unavailable, "pad": self.liveness, "r": [r.to_json() for r in self.reasons],
               "c": self.capture_error}
        if self.binding:
            out["b"] = self.binding
        if self.authenticator:
            out["a"] = self.authenticator
        if self.operating_point():
            out["op"] = self.operating_point()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FactorOutcome":
        op = d.get("op") or {}
        return cls(d["f"], d["p"], d["l"], d["v"], d["d"], d["u"], d["pad"],
                   tuple(Reason.from_json(r) for r in d["r"]), d.get("c", False), d.get("b", ""), d.get("a", ""),
                   op.get("fmr"), op.get("fmr_measured"), op.get("apcer"), op.get("apcer_measured"))


@dataclass(frozen=True)
class Plan:
    """What this session must show, fixed when it starts (and widened by degraded mode)."""

    required: float
    min_factors: int
    sets: tuple[tuple[str, ...], ...]
    degraded_sets: tuple[tuple[str, ...], ...] = ()
    degraded_required: float = 0.0
    degraded: tuple[str, ...] = ()  # modalities found unavailable
    review: bool = False
    deny: bool = False
    review_reasons: tuple[Reason, ...] = ()
    min_independent: int = 0  # distinct authenticators among the passed factors

    def acceptable(self) -> list[tuple[str, ...]]:
        return list(self.sets) + [s for s in self.degraded_sets if s not in self.sets]

    def to_json(self) -> dict[str, Any]:
        out = {"required": self.required, "min_factors": self.min_factors, "sets": [list(s) for s in self.sets],
               "degraded_sets": [list(s) for s in self.degraded_sets], "degraded_required": self.degraded_required,
               "degraded": list(self.degraded), "review": self.review, "deny": self.deny,
               "review_reasons": [r.to_json() for r in self.review_reasons]}
        if self.min_independent:
            out["min_independent"] = self.min_independent
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        return cls(d["required"], d["min_factors"], tuple(tuple(s) for s in d["sets"]),
                   tuple(tuple(s) for s in d["degraded_sets"]), d["degraded_required"], tuple(d["degraded"]),
                   d["review"], d["deny"], tuple(Reason.from_json(r) for r in d["review_reasons"]),
                   d.get("min_independent", 0))

    def degrade(self, modality: str, policy: Policy, device_usable: bool) -> "Plan":
        """The plan once ``modality``'s service is found unavailable."""
        if modality in self.degraded:
            return self
        keep = tuple(s for s in self.sets if modality not in s)
        extra = tuple(tuple(s) for s in policy.degraded.acceptable
                      if modality not in s and (device_usable or "device" not in s))
        return Plan(self.required, self.min_factors, keep, self.degraded_sets + extra, policy.degraded.required,
                    self.degraded + (modality,), self.review, self.deny, self.review_reasons, self.min_independent)


    def fall_back(self, factor: str, sets: Sequence[Sequence[str]], policy: Policy, device_usable: bool) -> "Plan":
        """The plan once ``factor`` (push) cannot reach the customer: its sets give way to ``sets``,
        held to the same bar (a fallback is a factor of its own, not a degraded mode)."""
        keep = tuple(s for s in self.sets if factor not in s)
        extra = tuple(tuple(s) for s in sets if (device_usable or "device" not in s)
                      and all(policy.factors.enabled(f) for f in s))
        return dataclasses.replace(self, sets=tuple(dict.fromkeys(keep + extra)),
                                   degraded_sets=tuple(s for s in self.degraded_sets if factor not in s))


def make_plan(policy: Policy, action: str, channel: str, risk: Assessment, device_usable: bool,
              unavailable: set[str]) -> Plan:
    rule = policy.actions[action]
    chan = rule.channels.get(channel)  # type: ignore[call-overload]
    sets = [tuple(s) for s in ((chan.acceptable if chan and chan.acceptable else None) or rule.acceptable)]
    base = chan.required if chan and chan.required else rule.required
    req = risk.requirement
    if req.min_factors:
        wide = [s for s in sets if len(s) >= req.min_factors]
        if not wide:  # widen the policy's own factors into combinations of the required size
            names = sorted({f for s in sets for f in s})
            wide = [tuple(c) for c in itertools.combinations(names, req.min_factors)]
        sets = wide
    if not device_usable:  # a device that is not bound cannot prove possession of its key
        sets = [s for s in sets if "device" not in s]
    sets = [s for s in sets if all(policy.factors.enabled(f) for f in s)]
    review_reasons = tuple(r for r in risk.reasons if req.review and r.code in {"FRAUD_SCRIPT_PHRASE", "AMOUNT_BAND"}) \
        or ((Reason("RISK_REVIEW", f"risk level {risk.level} requires review"),) if req.review else ())
    plan = Plan(base + req.extra_evidence, req.min_factors, tuple(dict.fromkeys(sets)),
                review=req.review, deny=req.deny, review_reasons=review_reasons,
                min_independent=req.min_independent)
    for modality in sorted(unavailable):
        plan = plan.degrade(modality, policy, device_usable)
    return plan


@dataclass(frozen=True)
class Decision:
    outcome: str  # "allow", "step_up", "deny", "review"
    reasons: tuple[Reason, ...]
    total: float
    still_needed: tuple[tuple[str, ...], ...] = ()
    amr: tuple[str, ...] = ()
    acr: str = ""
    passed: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasons", unique(self.reasons))


def evidence(outcomes: list[FactorOutcome]) -> dict[str, float]:
    """Per factor, the strongest attempt's evidence (unavailable attempts bring none)."""
    best: dict[str, float] = {}
    for o in outcomes:
        if not o.unavailable:
            best[o.factor] = max(best.get(o.factor, o.llr), o.llr)
    return best


def independent(outcomes: list[FactorOutcome]) -> set[str]:
    """The distinct authenticators behind the passed factors."""
    return {o.source for o in outcomes if o.passed}


def _adds_authenticator(factor: str, sources: set[str]) -> bool:
    """Whether passing ``factor`` could bring an authenticator not yet among ``sources`` (a capture
    is bound to a device or terminal already used; a device proof may be a second device)."""
    if factor == "sms_otp":
        return "sms" not in sources and "sms_otp" not in sources
    return factor == "device" and not any(s.startswith("device") for s in sources)


def assurance(passed: set[str]) -> tuple[tuple[str, ...], str]:
    amr = tuple(dict.fromkeys(AMR[f] for f in sorted(passed)))
    kinds = {"bio" if f in BIOMETRIC else "have" for f in passed if f in BIOMETRIC | POSSESSION}
    if len(passed) >= 2:
        amr += ("mfa",)
    return amr, "aal2" if len(kinds) >= 2 else "aal1" if passed else ""


def decide(plan: Plan, outcomes: list[FactorOutcome], locked: bool = False) -> Decision:
    passed = {o.factor for o in outcomes if o.passed}
    ev = evidence(outcomes)
    total = round(sum(ev.values()), 4)
    amr, acr = assurance(passed)

    def end(outcome: str, *reasons: Reason, needed=()) -> Decision:
        keep_amr = amr if outcome in ("allow", "review") else ()
        return Decision(outcome, tuple(reasons), total, tuple(needed), keep_amr,
                        acr if outcome in ("allow", "review") else "", tuple(sorted(passed)))

    if locked:
        return end("deny", Reason("SUBJECT_LOCKED", "too many consecutive failures: locked for a while; "
                                                    "a bound device can still prove its key"))
    if plan.deny:
        return end("deny", Reason("RISK_DENY", "the risk assessment does not allow this action"))
    if any(o.deny and o.factor not in BIOMETRIC for o in outcomes):  # "not me" on the bound app
        return end("deny", Reason("CUSTOMER_DENIED", "the customer denied the transaction on their bound device"),
                   *[r for o in outcomes if o.deny for r in o.reasons])
    if any(o.veto for o in outcomes):
        return end("deny", Reason("VETO", "a liveness, spoof or replay check failed"),
                   *[r for o in outcomes if o.veto for r in o.reasons])
    if any(o.deny for o in outcomes):
        return end("deny", Reason("BIOMETRIC_MISMATCH", "strong evidence that the sample is of another person"),
                   *[r for o in outcomes if o.deny for r in o.reasons])
    summary = Reason("EVIDENCE", f"total {total:.2f} of {plan.required:.2f} required; passed: "
                     + (", ".join(sorted(passed)) or "none"))
    sources = independent(outcomes)
    normal = [s for s in plan.sets if set(s) <= passed]
    if normal and total >= plan.required and len(passed) >= plan.min_factors and len(sources) >= plan.min_independent:
        if plan.review:
            return end("review", summary, *plan.review_reasons)
        return end("allow", summary)
    degraded = [s for s in plan.degraded_sets if set(s) <= passed]
    if degraded and total >= plan.degraded_required:
        return end("review", summary, Reason("DEGRADED_MODE", "biometric service unavailable: "
                                             + ", ".join(plan.degraded)), *plan.review_reasons)
    needed = [tuple(f for f in s if f not in passed) for s in plan.acceptable()]
    needed = [n for n in dict.fromkeys(needed) if n]
    # only the smallest completions: {sms_otp} makes {voice, sms_otp} pointless to ask for
    needed = [n for n in needed if not any(set(m) < set(n) for m in needed)]
    if normal and len(sources) < plan.min_independent:  # enough factors, too few independent ones
        more = [tuple(f for f in s if f not in passed) for s in plan.sets]
        more = [n for n in dict.fromkeys(more) if n and any(_adds_authenticator(f, sources) for f in n)]
        needed = [n for n in more if not any(set(m) < set(n) for m in more)] or needed
    if not needed:
        if not plan.acceptable():
            return end("deny", summary, Reason("NO_ACCEPTABLE_FACTORS", "no factor combination is available"))
        return end("deny", summary, Reason("INSUFFICIENT_EVIDENCE", "every acceptable factor was used"))
    reason = Reason("STEP_UP", "more factors needed") if not passed else \
        Reason("STEP_UP", "the evidence so far is not enough for this action")
    return end("step_up", summary, reason, needed=needed)
