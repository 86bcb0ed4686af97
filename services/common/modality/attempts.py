"""Failed verifications per subject (services/common/config.py VerifyLimit), the same in the face
and voice services: a bound on guesses and on climbing the score that every Verify answers with,
for any caller, the MFA's lockout seeing its own sessions only.

An attempt is charged before the comparison, by the one atomic upsert of the rate-limit window, so
that concurrent attempts see each other's charge; unless the service marks it failed (a comparison
that did not match, a spoof), it is given back: a match, a capture with nothing to compare, an
error. Only a request that is whole and valid is charged (bad input never counts). The counter is
keyed by the subject's pseudonym and erased with the subject.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from services.common.config import VerifyLimit
from services.common.runtime import Runtime
from services.common.storage.db import utcnow

from .reasons import refusal


class TenantPolicy(Protocol):
    @property
    def verify_limit(self) -> VerifyLimit | None: ...


@dataclass
class Attempt:
    failed: bool = False  # set by the service once a comparison did not match: the charge is kept


class VerifyLimiter:
    def __init__(self, rt: Runtime, modality: str, default: VerifyLimit, tenants: Mapping[str, TenantPolicy]) -> None:
        self.rt, self.modality, self.default, self.tenants = rt, modality, default, tenants

    def key(self, tenant: str, subject: str) -> str:
        return f"{self.modality}:verify:{self.rt.pseudonymize(tenant, subject)}"

    def limit(self, tenant: str) -> VerifyLimit:
        own = self.tenants.get(tenant)
        return own.verify_limit if own is not None and own.verify_limit is not None else self.default

    @contextmanager
    def attempt(self, tenant: str, subject: str) -> Iterator[Attempt]:
        """Charges one failure, refused RESOURCE_EXHAUSTED VERIFY_LIMITED past the limit; gives it
        back on leaving unless the attempt was marked failed."""
        limit = self.limit(tenant)
        if not limit.failures:
            yield Attempt()
            return
        now = utcnow()
        key = self.key(tenant, subject)
        ok, _ = self.rt.storage.rate_limits.hit(key, limit.window_s, limit.failures, now)
        if not ok:
            wait = max(1, math.ceil(limit.window_s - now.timestamp() % limit.window_s))
            raise refusal("VERIFY_LIMITED", f"{limit.failures} failed verifications of this subject within "
                          f"{limit.window_s} s: try again in {wait} s", metadata={"retry_after_s": str(wait)})
        attempt = Attempt()
        try:
            yield attempt
        finally:
            if not attempt.failed:
                self.rt.storage.rate_limits.refund(key, limit.window_s, now)

    def erase(self, tenant: str, subject: str) -> None:
        """With the subject's erasure: its counter is kept under its pseudonym."""
        self.rt.storage.rate_limits.reset(self.key(tenant, subject))
