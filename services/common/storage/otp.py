"""One-time-password challenges: hashed code, expiry, attempt budget, single use."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .db import Repository, from_ts
from .errors import AlreadyExistsError
from .interfaces import OtpRecord

_COLS = (
    "id, session_id, tenant_id, subject_id, code_hash, expires_at, attempts, max_attempts,"
    " sent_at, consumed_at"
)


def _record(row: Any) -> OtpRecord:
    return OtpRecord(
        id=row[0],
        session_id=row[1],
        tenant_id=row[2],
        subject_id=row[3],
        code_hash=row[4],
        expires_at=from_ts(row[5]),
        attempts=row[6],
        max_attempts=row[7],
        sent_at=from_ts(row[8]),
        consumed_at=from_ts(row[9]),
    )


class SqlOtpRepository(Repository):
    table = "otp_challenges"

    def create(self, rec: OtpRecord) -> OtpRecord:
        with self._db.transaction() as s:
            row = s.one(
                f"INSERT INTO otp_challenges ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                f" ON CONFLICT DO NOTHING RETURNING {_COLS}",
                (
                    rec.id, rec.session_id, rec.tenant_id, rec.subject_id, rec.code_hash,
                    rec.expires_at, rec.attempts, rec.max_attempts, rec.sent_at, rec.consumed_at,
                ),
            )
        if row is None:
            raise AlreadyExistsError("OTP id already in use")
        return _record(row)

    def get(self, otp_id: str) -> OtpRecord | None:
        with self._db.read() as s:
            row = s.one(f"SELECT {_COLS} FROM otp_challenges WHERE id = ?", (otp_id,))
        return _record(row) if row else None

    def get_active_for_session(self, session_id: str, now: datetime) -> OtpRecord | None:
        with self._db.read() as s:
            row = s.one(
                f"SELECT {_COLS} FROM otp_challenges WHERE session_id = ? AND consumed_at IS NULL"
                " AND expires_at > ? AND attempts < max_attempts ORDER BY sent_at DESC, id LIMIT 1",
                (session_id, now),
            )
        return _record(row) if row else None

    def record_attempt(self, otp_id: str, now: datetime) -> OtpRecord | None:
        with self._db.transaction() as s:
            row = s.one(
                "UPDATE otp_challenges SET attempts = attempts + 1 WHERE id = ?"
                " AND consumed_at IS NULL AND expires_at > ? AND attempts < max_attempts"
                f" RETURNING {_COLS}",
                (otp_id, now),
            )
        return _record(row) if row else None

    def consume(self, otp_id: str, now: datetime) -> bool:
        return self._update_one(
            "UPDATE otp_challenges SET consumed_at = ? WHERE id = ? AND consumed_at IS NULL"
            " AND expires_at > ?",
            (now, otp_id, now),
        )
