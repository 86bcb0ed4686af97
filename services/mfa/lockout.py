"""Throttling and bounded locks of consecutive failures, per subject and per source (NIST SP
800-63B-4 § 3.2.2).

Failures are weighed so that the policy's two limits share one counter: a failure without
presentation attack detection costs 1/max_failures of the lock, a biometric failure with liveness
checked 1/max_failures_with_liveness (5, or 10 with PAD). From ``delay_after`` failures on, each
further attempt must wait ``delay_s``, doubling; at the limit the scope is locked for a bounded
time (``subject_lock_s``, ``device_lock_s``; an administrator may unlock earlier). An ALLOW resets
both counters.

Two scopes: the subject, and the source a session runs on (the device fingerprint; sessions
without a device, IVR and kiosk, have none). A session on one of the subject's bound devices is
held to its own device's counter only: failures from other devices slow an attacker down and
lock the subject for everyone else, but not the customer on their own phone, who must then prove
its key before a decision.

An attempt is charged before it is evaluated (:meth:`Lockouts.attempt`, under a lock of the
subject's counters), and settled afterwards (:meth:`Lockouts.settle`: kept, lightened for a
biometric with PAD, or given back for a pass, an unusable capture or an outage). Concurrent
attempts therefore never evaluate more than the limit allows, and a crash mid-attempt counts as a
failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import grpc

from services.common import errors
from services.common.audit import AuditLog

from .fusion import FactorOutcome
from .policy.schema import Lockout as LockoutPolicy
from .storage import LOCK_COST, LockoutRecord, MfaStore


@dataclass(frozen=True)
class State:
    locked: bool
    wait_s: float  # throttle: seconds before the next attempt is accepted
    failures: float  # in units of max_failures failures
    attempts_left: int  # full-cost failures left before the lock


OPEN = State(False, 0.0, 0.0, 0)

def _state(rec: LockoutRecord | None, p: LockoutPolicy, lock_s: int, now: datetime) -> State:
    if rec is None:
        return State(False, 0.0, 0.0, p.max_failures)
    unit = LOCK_COST / p.max_failures
    equiv = rec.cost / unit
    left = max(0, math.ceil((LOCK_COST - rec.cost) / unit))
    if rec.locked_at is not None:
        if lock_s == 0 or (now - rec.locked_at).total_seconds() < lock_s:
            return State(True, 0.0, equiv, 0)
        return State(False, 0.0, 0.0, p.max_failures)  # the lock ran out
    wait = 0.0
    if equiv >= p.delay_after and rec.last_failure_at is not None:
        delay = p.delay_s * 2 ** (math.floor(equiv) - p.delay_after)
        since = max(0.0, (now - rec.last_failure_at).total_seconds())  # a concurrent attempt may be newer
        wait = max(0.0, delay - since)
    return State(False, wait, equiv, left)


@dataclass(frozen=True)
class Attempt:
    """An attempt charged in advance: what to keep or give back once it is evaluated."""

    tenant: str
    subject: str
    scopes: tuple[tuple[str, str, datetime | None, bool], ...]  # (scope, key, last failure before, this charge locked it)
    cost: int
    at: datetime
    bound: bool


class Lockouts:
    def __init__(self, store: MfaStore, audit: AuditLog) -> None:
        self.store, self.audit = store, audit

    @staticmethod
    def _lock_s(scope: str, p: LockoutPolicy) -> int:
        return p.subject_lock_s if scope == "subject" else p.device_lock_s

    def _get(self, tenant: str, scope: str, key: str, p: LockoutPolicy, now: datetime) -> State:
        rec = self.store.lockouts.get(tenant, scope, key)
        state = _state(rec, p, self._lock_s(scope, p), now)
        if rec is not None and rec.locked_at is not None and not state.locked:
            self.store.lockouts.reset(tenant, scope, key, rec.locked_at)
        return state

    def subject(self, tenant: str, subject: str, p: LockoutPolicy, now: datetime) -> State:
        return self._get(tenant, "subject", subject, p, now)

    def source(self, tenant: str, source: str, p: LockoutPolicy, now: datetime) -> State:
        return self._get(tenant, "device", source, p, now) if source else State(False, 0.0, 0.0, p.max_failures)

    def check(self, tenant: str, subject: str, source: str, p: LockoutPolicy, now: datetime,
              bound: bool = False) -> State:
        """The state that limits this session (its device's on a bound device, else the subject's),
        or an error when it is locked or throttled."""
        d = self.source(tenant, source, p, now)
        s = d if bound else self.subject(tenant, subject, p, now)
        if s.locked and not bound:
            raise errors.failed_precondition(
                "the subject is locked after too many consecutive failures; try again later, or from a "
                "bound device", "SUBJECT_LOCKED")
        if d.locked:
            raise errors.failed_precondition("this device is locked after too many consecutive failures; "
                                             "try again later", "DEVICE_LOCKED")
        wait = max(s.wait_s, d.wait_s)
        if wait > 0:
            raise errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"too many failures: try again in {math.ceil(wait)} s", "THROTTLED",
                                      metadata={"retry_after_s": str(math.ceil(wait))})
        return s

    def attempt(self, tenant: str, subject: str, source: str, p: LockoutPolicy, now: datetime,
                bound: bool, actor: str) -> Attempt:
        """Check and charge one full-cost failure in one transaction under the subject's lock, so
        that concurrent attempts see each other's charge. A new device counter beyond the policy's
        ``device_counters_per_subject`` drops the oldest, audited in the same transaction."""
        cost = math.ceil(LOCK_COST / p.max_failures)
        db = self.store.db
        with db.transaction() as s:
            db.lock(s, f"mfa-lockout|{tenant}|{subject}")
            self.check(tenant, subject, source, p, now, bound)
            scopes = []
            for scope, key in [("subject", subject)] + ([("device", source)] if source else []):
                before = self.store.lockouts.get(tenant, scope, key)
                after = self.store.lockouts.record_failure(tenant, scope, key, subject, cost, now)
                locked_now = after.locked_at is not None and not (before and before.locked_at is not None)
                scopes.append((scope, key, before.last_failure_at if before else None, locked_now))
                if scope == "device" and before is None:
                    dropped, locked = self.store.lockouts.trim_devices(tenant, subject, p.device_counters_per_subject)
                    if dropped:
                        self.audit.append("mfa.device_counters_dropped", actor, tenant, subject,
                                          {"dropped": dropped, "locked": locked, "kept": p.device_counters_per_subject})
        return Attempt(tenant, subject, tuple(scopes), cost, now, bound)

    def settle(self, attempt: Attempt, outcome: FactorOutcome | None, p: LockoutPolicy, actor: str) -> State:
        """Keep the charge of a failure (lightened for a biometric with PAD), give back any other;
        -> the limiting state afterwards. Joins the caller's transaction."""
        failed = outcome is not None and outcome.counts_as_failure
        keep = math.ceil(LOCK_COST / p.max_failures_with_liveness) if failed and outcome is not None and outcome.liveness else attempt.cost
        result = None
        for scope, key, last_before, locked_now in attempt.scopes:
            if not failed:
                rec = self.store.lockouts.refund(attempt.tenant, scope, key, attempt.cost, 1, attempt.at, last_before)
            elif keep < attempt.cost:
                rec = self.store.lockouts.refund(attempt.tenant, scope, key, attempt.cost - keep, 0, attempt.at, None)
            else:
                rec = self.store.lockouts.get(attempt.tenant, scope, key)
            if failed and locked_now and rec is not None and rec.locked_at is not None:
                self.audit.append(f"mfa.{scope}_locked", actor, attempt.tenant, attempt.subject,
                                  {"failures": rec.failures, "scope": scope})
            state = _state(rec, p, self._lock_s(scope, p), attempt.at)
            if scope == ("device" if attempt.bound else "subject"):
                result = state
        return result or State(False, 0.0, 0.0, p.max_failures)

    def release(self, attempt: Attempt, p: LockoutPolicy) -> None:
        """Give the whole charge back (the attempt was refused before it counted)."""
        with self.store.db.transaction():
            self.settle(attempt, None, p, "system")

    def locked_for_decision(self, tenant: str, subject: str, source: str, p: LockoutPolicy, now: datetime,
                            outcomes: list[FactorOutcome]) -> bool:
        """A decision is refused while the session's device is locked, or the subject is and the
        session has not proven a bound device's key."""
        if self.source(tenant, source, p, now).locked:
            return True
        proven = any(o.passed and o.source.startswith("device:") for o in outcomes)
        return self.subject(tenant, subject, p, now).locked and not proven

    def success(self, tenant: str, subject: str, device_fp: str) -> None:
        self.store.lockouts.reset(tenant, "subject", subject)
        if device_fp:
            self.store.lockouts.reset(tenant, "device", device_fp)

    def unlock(self, tenant: str, subject: str) -> bool:
        """The subject, and the devices its own failures locked."""
        return self.store.lockouts.delete_for_subject(tenant, subject) > 0
