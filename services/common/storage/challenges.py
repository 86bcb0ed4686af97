"""Single-use nonces (liveness and digit challenges), shared by every replica."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .db import Repository, from_json, from_ts, utcnow
from .errors import (
    AlreadyExistsError,
    ChallengeExpiredError,
    ChallengeMismatchError,
    ChallengeNotFoundError,
    ChallengeUsedError,
)
from .interfaces import ChallengeRecord

_COLS = "nonce, tenant_id, subject_id, kind, payload, created_at, expires_at, consumed_at"


class SqlChallengeRepository(Repository):
    table = "challenges"

    def create(self, rec: ChallengeRecord) -> ChallengeRecord:
        with self._db.transaction() as s:
            row = s.one(
                f"INSERT INTO challenges ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                f" ON CONFLICT DO NOTHING RETURNING {_COLS}",
                (
                    rec.nonce, rec.tenant_id, rec.subject_id, rec.kind, dict(rec.payload),
                    rec.created_at, rec.expires_at, rec.consumed_at,
                ),
            )
        if row is None:
            raise AlreadyExistsError("challenge nonce already in use")
        return ChallengeRecord(
            nonce=row[0],
            tenant_id=row[1],
            subject_id=row[2],
            kind=row[3],
            payload=from_json(row[4]),
            created_at=from_ts(row[5]),
            expires_at=from_ts(row[6]),
            consumed_at=from_ts(row[7]),
        )

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
                "SELECT tenant_id, subject_id, kind, expires_at, consumed_at FROM challenges"
                " WHERE nonce = ?",
                (nonce,),
            )
        if why is None:
            raise ChallengeNotFoundError("unknown challenge")
        if (why[0], why[1], why[2]) != (tenant_id, subject_id, kind):
            raise ChallengeMismatchError("challenge was issued for another subject or purpose")
        if why[4] is not None:
            raise ChallengeUsedError("challenge already used")
        raise ChallengeExpiredError("challenge expired")
