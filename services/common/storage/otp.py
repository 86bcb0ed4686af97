"""One-time-password challenges: hashed code, expiry, attempt budget, single use."""

from __future__ import annotations

from datetime import datetime

from .interfaces import OtpRecord
from .repository import Repository


class SqlOtpRepository(Repository[OtpRecord]):
    table = "otp_challenges"
    record = OtpRecord

    def create(self, rec: OtpRecord) -> OtpRecord:
        return self._insert_new(rec, "OTP id already in use")

    def get(self, otp_id: str) -> OtpRecord | None:
        return self._select_one("id = ?", (otp_id,))

    def get_active_for_session(self, session_id: str, now: datetime) -> OtpRecord | None:
        return self._select_one(
            "session_id = ? AND consumed_at IS NULL AND expires_at > ? AND attempts < max_attempts",
            (session_id, now),
            "ORDER BY sent_at DESC, id LIMIT 1",
        )

    def record_attempt(self, otp_id: str, now: datetime) -> OtpRecord | None:
        with self._db.transaction() as s:
            return self._returning(
                s,
                "UPDATE otp_challenges SET attempts = attempts + 1 WHERE id = ?"
                " AND consumed_at IS NULL AND expires_at > ? AND attempts < max_attempts",
                (otp_id, now),
            )

    def consume(self, otp_id: str, now: datetime) -> bool:
        return self._update_one(
            "UPDATE otp_challenges SET consumed_at = ? WHERE id = ? AND consumed_at IS NULL"
            " AND expires_at > ?",
            (now, otp_id, now),
        )
