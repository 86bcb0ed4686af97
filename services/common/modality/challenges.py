"""Single-use challenges (face head moves, voice digits) as the services issue and spend them.

One error map for every service, and one rule for when a nonce is spent: the service validates
and decodes the whole request first and consumes the nonce last, just before deciding, so that a
malformed request never burns a challenge. Consuming is one conditional UPDATE in storage: of two
requests with the same nonce exactly one wins. Refusals are audited (with the reason, never the
nonce).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Mapping, overload

from services.common.context import Principal
from services.common.runtime import Runtime
from services.common.storage import (
    ChallengeExpiredError,
    ChallengeMismatchError,
    ChallengeNotFoundError,
    ChallengeRecord,
    ChallengeUsedError,
)
from services.common.storage.db import utcnow

from .reasons import refusal

MAX_NONCE_CHARS = 128
_ERRORS = (
    (ChallengeNotFoundError, "CHALLENGE_NOT_FOUND"),
    (ChallengeExpiredError, "CHALLENGE_EXPIRED"),
    (ChallengeUsedError, "CHALLENGE_USED"),
    (ChallengeMismatchError, "CHALLENGE_MISMATCH"),
)


@dataclass(frozen=True)
class Spent:
    payload: Mapping[str, Any]
    issued_ago_ms: float  # from issue to consumption, by the server's clock


@overload
def nonce_field(value: str, field: str, required: Literal[True]) -> str: ...
@overload
def nonce_field(value: str, field: str, required: bool) -> str | None: ...
def nonce_field(value: str, field: str, required: bool) -> str | None:
    """The nonce of a request (None: no challenge), refused when required and missing or too long."""
    if not value:
        if required:
            raise refusal("INVALID_ARGUMENT", f"{field} is required", fields={field: "required"})
        return None
    if len(value) > MAX_NONCE_CHARS:
        raise refusal("INVALID_ARGUMENT", f"{field} is longer than {MAX_NONCE_CHARS} characters",
                      fields={field: "too long"})
    return value


class Challenges:
    def __init__(self, rt: Runtime, modality: str, kind: str) -> None:
        self.rt, self.modality, self.kind = rt, modality, kind

    def issue(self, tenant: str, subject: str, payload: Mapping[str, Any], ttl_s: int,
              details: Mapping[str, Any], caller: Principal) -> ChallengeRecord:
        now = utcnow()
        with self.rt.storage.transaction():  # the challenge and its audit record, or neither
            rec = self.rt.storage.challenges.create(ChallengeRecord(
                tenant, subject, self.kind, {**payload, "issued_at": now.isoformat()},
                expires_at=now + timedelta(seconds=ttl_s), created_at=now))
            self.rt.audit.append(f"{self.modality}.challenge_started", caller.name, tenant, subject,
                                 {**details, "ttl_s": ttl_s})
        return rec

    def consume(self, tenant: str, subject: str, nonce: str, caller: Principal) -> Spent:
        try:
            payload = dict(self.rt.storage.challenges.consume(nonce, tenant, subject, self.kind))
        except tuple(e for e, _ in _ERRORS) as err:
            code = next(c for e, c in _ERRORS if isinstance(err, e))
            self.rt.audit.append(f"{self.modality}.challenge_refused", caller.name, tenant, subject, {"reason": code})
            raise refusal(code) from None
        issued = payload.get("issued_at")
        ago = (utcnow() - datetime.fromisoformat(issued)).total_seconds() * 1000.0 if issued else 0.0
        return Spent(payload, ago)
