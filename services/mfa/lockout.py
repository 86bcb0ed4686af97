"""Lockout and throttling of consecutive failures, per subject and per device.

Failures are weighed so that the policy's two limits share one counter: a failure without
presentation attack detection costs 1/max_failures of the lock, a biometric failure with liveness
checked 1/max_failures_with_liveness (NIST SP 800-63B-4: 5, or 10 with PAD). From ``delay_after``
failures on, each further attempt must wait ``delay_s``, doubling; at the limit the scope is
locked: a subject until an administrator unlocks it (or ``subject_lock_s``), a device for
``device_lock_s``. An ALLOW resets both counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import grpc

from services.common import errors
from services.common.audit import AuditLog

from .policy.schema import Lockout as LockoutPolicy
from .storage import LOCK_COST, LockoutRecord, MfaStore


@dataclass(frozen=True)
class State:
    locked: bool
    wait_s: float  # throttle: seconds before the next attempt is accepted
    failures: float  # in units of max_failures failures
    attempts_left: int  # full-cost failures left before the lock


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
        wait = max(0.0, delay - (now - rec.last_failure_at).total_seconds())
    return State(False, wait, equiv, left)


class Lockouts:
    def __init__(self, store: MfaStore, audit: AuditLog) -> None:
        self.store, self.audit = store, audit

    def _get(self, tenant: str, scope: str, key: str, p: LockoutPolicy, now: datetime) -> State:
        rec = self.store.lockouts.get(tenant, scope, key)
        lock_s = p.subject_lock_s if scope == "subject" else p.device_lock_s
        state = _state(rec, p, lock_s, now)
        if rec is not None and rec.locked_at is not None and not state.locked:
            self.store.lockouts.reset(tenant, scope, key)
        return state

    def subject(self, tenant: str, subject: str, p: LockoutPolicy, now: datetime) -> State:
        return self._get(tenant, "subject", subject, p, now)

    def check(self, tenant: str, subject: str, device_fp: str, p: LockoutPolicy, now: datetime) -> State:
        """The subject's state, or an error when the subject or device is locked or throttled."""
        s = self.subject(tenant, subject, p, now)
        if s.locked:
            raise errors.failed_precondition(
                "the subject is locked after too many consecutive failures; an administrator must unlock it",
                "SUBJECT_LOCKED")
        d = self._get(tenant, "device", device_fp, p, now) if device_fp else State(False, 0.0, 0.0, p.max_failures)
        if d.locked:
            raise errors.failed_precondition("this device is locked after too many consecutive failures",
                                             "DEVICE_LOCKED")
        wait = max(s.wait_s, d.wait_s)
        if wait > 0:
            raise errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"too many failures: try again in {math.ceil(wait)} s", "THROTTLED",
                                      metadata={"retry_after_s": str(math.ceil(wait))})
        return s

    def failure(self, tenant: str, subject: str, device_fp: str, p: LockoutPolicy, liveness: bool,
                actor: str, now: datetime) -> State:
        cost = math.ceil(LOCK_COST / (p.max_failures_with_liveness if liveness else p.max_failures))
        scopes = [("subject", subject, subject)] + ([("device", device_fp, subject)] if device_fp else [])
        result = None
        for scope, key, owner in scopes:
            before = self.store.lockouts.get(tenant, scope, key)
            rec = self.store.lockouts.record_failure(tenant, scope, key, owner, cost, now)
            if rec.locked_at is not None and (before is None or before.locked_at is None):
                self.audit.append(f"mfa.{scope}_locked", actor, tenant, subject,
                                  {"failures": rec.failures, "scope": scope})
            if scope == "subject":
                result = _state(rec, p, p.subject_lock_s, now)
        assert result is not None
        return result

    def success(self, tenant: str, subject: str, device_fp: str) -> None:
        self.store.lockouts.reset(tenant, "subject", subject)
        if device_fp:
            self.store.lockouts.reset(tenant, "device", device_fp)

    def unlock(self, tenant: str, subject: str) -> bool:
        """The subject, and the devices its own failures locked."""
        return self.store.lockouts.delete_for_subject(tenant, subject) > 0
