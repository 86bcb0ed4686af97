"""The state of an authentication session, typed.

Stored as JSON in ``auth_sessions.state``, in the shape the orchestrator has always written (so
sessions stored before the state was typed load unchanged, and a rollback reads new ones). Every
change goes through :meth:`services.mfa.sessions.Sessions.mutate`, which parses a fresh copy
from storage for each compare-and-swap attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .fusion import FactorOutcome, Plan
from .reasons import Reason


@dataclass
class DeviceState:
    fp: str  # keyed fingerprint of the device the session started on; "" without one (IVR, kiosk)
    state: str  # "bound", "drifted", "new", "unbound" or "absent"
    device_id: str | None = None  # the bound device it matched

    def to_json(self) -> dict[str, Any]:
        return {"fp": self.fp, "state": self.state, "device_id": self.device_id}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeviceState:
        return cls(d.get("fp", ""), d.get("state", "absent"), d.get("device_id"))


@dataclass
class RiskState:
    score: float
    level: str
    reasons: list[Reason]

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "level": self.level, "reasons": [r.to_json() for r in self.reasons]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RiskState:
        return cls(float(d["score"]), d["level"], [Reason.from_json(r) for r in d["reasons"]])


@dataclass
class DecisionState:
    """A final (or, unstored, a step-up) decision with its signed token."""

    outcome: str
    reasons: list[Reason]
    total: float
    still_needed: list[tuple[str, ...]]
    amr: list[str]
    acr: str
    review_id: str
    token: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reasons": [r.to_json() for r in self.reasons], "total": self.total,
                "still_needed": [list(s) for s in self.still_needed], "amr": list(self.amr), "acr": self.acr,
                "review_id": self.review_id, "token": self.token, "at": self.at.isoformat()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DecisionState:
        return cls(d["outcome"], [Reason.from_json(r) for r in d["reasons"]], float(d["total"]),
                   [tuple(s) for s in d["still_needed"]], list(d["amr"]), d["acr"], d.get("review_id", ""),
                   d["token"], datetime.fromisoformat(d["at"]))


@dataclass
class SessionState:
    channel: str
    action: str
    amount: tuple[str, int] | None  # (ISO 4217 currency, minor units)
    device: DeviceState
    nonce: str  # what a bound device signs
    policy_version: str
    risk: RiskState
    plan: Plan
    factors: list[FactorOutcome] = field(default_factory=list)
    challenges: dict[str, list[str]] = field(default_factory=dict)  # factor -> nonces handed out
    otp_sent_at: datetime | None = None
    place: tuple[str, float | None, float | None] | None = None  # (country, latitude, longitude)
    decision: DecisionState | None = None
    request_hash: str | None = None  # of the request an idempotency key first came with
    bound_device_id: str | None = None  # the device this session bound
    payee: str | None = None  # keyed hash of the payee the user was shown (never the payee itself)
    pending_key: str | None = None  # SHA-256 of the new device's key that signed captures: the only one it may bind
    request_id: str | None = None  # of the call that started the session: carried by every push step
    push: dict[str, Any] | None = None  # the push confirmation out (services/mfa/factors/push.py)
    push_sends: int = 0
    callback_channel: str | None = None  # "ivr": the push fallback's voice factor may come from the IVR platform
    proven_devices: list[str] = field(default_factory=list)  # proven by a DeviceProof: each counts once
    submissions: int = 0  # factor evidence submitted, passed or not (Policy.session.max_submissions)

    @property
    def device_usable(self) -> bool:
        """The session started on a bound device, whose key can prove possession."""
        return self.device.device_id is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "channel": self.channel, "action": self.action,
            "amount": list(self.amount) if self.amount else None,
            "device": self.device.to_json(), "nonce": self.nonce, "policy_version": self.policy_version,
            "risk": self.risk.to_json(), "plan": self.plan.to_json(),
            "factors": [f.to_json() for f in self.factors],
            "challenges": {k: list(v) for k, v in self.challenges.items()},
            "otp_sent_at": self.otp_sent_at.isoformat() if self.otp_sent_at else None,
            "place": list(self.place) if self.place else None,
            "decision": self.decision.to_json() if self.decision else None,
            "request_hash": self.request_hash,
        }
        if self.bound_device_id:
            out["bound_device_id"] = self.bound_device_id
        if self.payee:
            out["payee"] = self.payee
        if self.pending_key:
            out["pending_key"] = self.pending_key
        for name in ("request_id", "push", "push_sends", "callback_channel", "proven_devices", "submissions"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SessionState:
        amount, place, sent, decision = d.get("amount"), d.get("place"), d.get("otp_sent_at"), d.get("decision")
        return cls(
            channel=d["channel"], action=d["action"],
            amount=(str(amount[0]), int(amount[1])) if amount else None,
            device=DeviceState.from_json(d.get("device") or {}), nonce=d["nonce"],
            policy_version=d["policy_version"], risk=RiskState.from_json(d["risk"]),
            plan=Plan.from_json(d["plan"]),
            factors=[FactorOutcome.from_json(f) for f in d.get("factors", [])],
            challenges={k: list(v) for k, v in (d.get("challenges") or {}).items()},
            otp_sent_at=datetime.fromisoformat(sent) if sent else None,
            place=(place[0], place[1], place[2]) if place else None,
            decision=DecisionState.from_json(decision) if decision else None,
            request_hash=d.get("request_hash"), bound_device_id=d.get("bound_device_id"),
            payee=d.get("payee"), pending_key=d.get("pending_key"), request_id=d.get("request_id"),
            push=d.get("push"), push_sends=int(d.get("push_sends", 0)), callback_channel=d.get("callback_channel"),
            proven_devices=list(d.get("proven_devices") or []), submissions=int(d.get("submissions", 0)),
        )
