"""Single-use nonces (liveness and digit challenges), shared by every replica."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .db import from_json, utcnow
from .errors import (
    ChallengeExpiredError,
    ChallengeMismatchError,
    ChallengeNotFoundError,
    ChallengeUsedError,
)
from .interfaces import ChallengeRecord
from .repository import Repository


class SqlChallengeRepository(Repository[ChallengeRecord]):
    table = "challenges"
    record = ChallengeRecord

    def create(self, rec: ChallengeRecord) -> ChallengeRecord:
        return self._insert_new(rec, "challenge nonce already in use")

    def consume(
        self, nonce: str, tenant_id: str, subject_id: str, kind: str, now: datetime | None = None
    ) -> Mapping[str, Any]:
        now = now or utcnow()
        with self._db.transaction() as s:
            # One conditional UPDATE decides the winner: two consumers can never both succeed.
            row = s.one(
                "UPDATE challenges SET consumed_at = ? WHERE nonce = ? AND tenant_id = ?"
                " AND subject_id = ? AND kind = ? AND consumed_at IS NULL AND expires_at > ?"
                " RETURNING payload",
                (now, nonce, tenant_id, subject_id, kind, now),
            )
            if row is not None:
                return from_json(row[0])
            why = s.one(
                "SELECT tenant_id, subject_id, kind, consumed_at FROM challenges WHERE nonce = ?",
                (nonce,),
            )
        if why is None:
            raise ChallengeNotFoundError("unknown challenge")
        if (why[0], why[1], why[2]) != (tenant_id, subject_id, kind):
            raise ChallengeMismatchError("challenge was issued for another subject or purpose")
        if why[3] is not None:
            raise ChallengeUsedError("challenge already used")
        raise ChallengeExpiredError("challenge expired")
