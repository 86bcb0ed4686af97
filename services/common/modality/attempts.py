"""Failed verifications per subject (services/common/config.py VerifyLimit), the same in the face
and voice services: a bound on guesses and on climbing the score that every Verify answers with,
for any caller, the MFA's lockout seeing its own sessions only.

Before the comparison the window's failures are read, with this process's attempts on the subject
still running counted as failures; only a comparison that did not match (or a spoof) writes one. A
genuine Verify thus adds a read and no write (two write transactions per call would serialise every
Verify behind SQLite's write lock). Other processes and replicas see an attempt once it has failed,
so a burst spread over N processes passes the bound by at most (N - 1) x the bound in a window; in
one process it cannot pass it, and concurrent genuine attempts are not refused below it. Only a
request that is whole and valid is counted (bad input never is). The counter is keyed by the
subject's pseudonym and erased with the subject.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from services.common import metrics
from services.common.config import VerifyLimit
from services.common.runtime import Runtime
from services.common.storage.db import utcnow

from .reasons import refusal



class TenantPolicy(Protocol):
    @property
    def verify_limit(self) -> VerifyLimit | None: ...


@dataclass
class Attempt:
    failed: bool = False  # set by the service once a comparison did not match: a failure is counted


class VerifyLimiter:
    def __init__(self, rt: Runtime, modality: str, default: VerifyLimit, tenants: Mapping[str, TenantPolicy]) -> None:
        self.rt, self.modality, self.default, self.tenants = rt, modality, default, tenants
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()
        # bound now: a series that first appears at 1 shows Prometheus no increase
        self._failed = metrics.VERIFY_FAILURES.labels(modality)
        self._limited = metrics.VERIFY_LIMITED.labels(modality)

    def key(self, tenant: str, subject: str) -> str:
        return f"{self.modality}:verify:{self.rt.pseudonymize(tenant, subject)}"

    def limit(self, tenant: str) -> VerifyLimit:
        own = self.tenants.get(tenant)
        return own.verify_limit if own is not None and own.verify_limit is not None else self.default

    @contextmanager
    def attempt(self, tenant: str, subject: str) -> Iterator[Attempt]:
        """Refused RESOURCE_EXHAUSTED VERIFY_LIMITED when the subject's failures in the window, with
        its attempts running here, reach the limit; counts a failure if the attempt is marked failed."""
        limit = self.limit(tenant)
        if not limit.failures:
            yield Attempt()
            return
        now = utcnow()
        key = self.key(tenant, subject)
        with self._lock:
            running = self._running[key]
            self._running[key] += 1
        try:
            if self.rt.storage.rate_limits.count(key, limit.window_s, now) + running >= limit.failures:
                wait = max(1, math.ceil(limit.window_s - now.timestamp() % limit.window_s))
                self._limited.inc()
                raise refusal("VERIFY_LIMITED", f"{limit.failures} failed verifications of this subject within "
                              f"{limit.window_s} s, counting its attempts still running: try again in {wait} s",
                              metadata={"retry_after_s": str(wait)})
            attempt = Attempt()
            yield attempt
            if attempt.failed:
                self._failed.inc()
                self.rt.storage.rate_limits.hit(key, limit.window_s, limit.failures, now)
        finally:
            with self._lock:
                self._running[key] -= 1
                if not self._running[key]:
                    del self._running[key]

    def erase(self, tenant: str, subject: str) -> None:
        """With the subject's erasure: its counter is kept under its pseudonym."""
        self.rt.storage.rate_limits.reset(self.key(tenant, subject))
