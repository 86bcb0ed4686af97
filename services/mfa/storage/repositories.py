"""SQL repositories of the MFA's own tables, on the storage's database (and in its transactions)."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from services.common.storage import ConcurrentUpdateError, NotFoundError
from services.common.storage.db import utcnow
from services.common.storage.repository import Repository
from services.common.storage.rows import insert_sql, values
from services.common.storage.subjects import ensure_subject

from .records import (
    AuthSessionRecord,
    DeviceRecord,
    LockoutRecord,
    OtpRecord,
    ReviewRecord,
    SubjectSignalRecord,
    WebhookEventRecord,
)

LOCK_COST = 1000


class SqlDeviceRepository(Repository[DeviceRecord]):
    table = "devices"
    record = DeviceRecord

    def add(self, rec: DeviceRecord) -> DeviceRecord:
        """Raises AlreadyExistsError for an id in use or an active device with the same fingerprint."""
        with self._db.transaction() as s:
            ensure_subject(s, rec.tenant_id, rec.subject_id, rec.bound_at)
            return self._insert_new(
                rec, "device id in use, or an active device with this fingerprint is bound"
            )

    def get(self, tenant_id: str, device_id: str) -> DeviceRecord | None:
        return self._select_one("tenant_id = ? AND id = ?", (tenant_id, device_id))

    def get_by_fingerprint(
        self, tenant_id: str, subject_id: str, fingerprint: str
    ) -> DeviceRecord | None:
        """The active (not revoked) device with this fingerprint."""
        return self._select_one(
            "tenant_id = ? AND subject_id = ? AND fingerprint = ? AND revoked_at IS NULL",
            (tenant_id, subject_id, fingerprint),
        )

    def list_for_subject(
        self, tenant_id: str, subject_id: str, include_revoked: bool = False
    ) -> list[DeviceRecord]:
        where = "tenant_id = ? AND subject_id = ?"
        if not include_revoked:
            where += " AND revoked_at IS NULL"
        return self._select(where, (tenant_id, subject_id), "ORDER BY bound_at, id")

    def revoke(self, tenant_id: str, device_id: str, now: datetime | None = None) -> bool:
        return self._update_one(
            "UPDATE devices SET revoked_at = ? WHERE tenant_id = ? AND id = ? AND revoked_at IS NULL",
            (now or utcnow(), tenant_id, device_id),
        )

    def get_by_credential(self, tenant_id: str, credential_id: str) -> DeviceRecord | None:
        return self._select_one("tenant_id = ? AND credential_id = ?", (tenant_id, credential_id))

    def advance_sign_count(self, tenant_id: str, device_id: str, seen: int, new: int) -> bool:
        """Compare-and-swap of a WebAuthn signature counter: False when another use moved it first."""
        return self._update_one(
            "UPDATE devices SET sign_count = ? WHERE tenant_id = ? AND id = ? AND sign_count = ?",
            (new, tenant_id, device_id, seen),
        )

    def set_push_token(self, tenant_id: str, device_id: str, token: str | None) -> bool:
        return self._update_one(
            "UPDATE devices SET push_token = ? WHERE tenant_id = ? AND id = ? AND revoked_at IS NULL",
            (token, tenant_id, device_id),
        )

    def flag(self, tenant_id: str, device_id: str, now: datetime) -> bool:
        return self._update_one(
            "UPDATE devices SET flagged_at = ? WHERE tenant_id = ? AND id = ?", (now, tenant_id, device_id)
        )

    def touch(self, tenant_id: str, device_id: str, now: datetime | None = None) -> bool:
        return self._update_one(
            "UPDATE devices SET last_seen_at = ? WHERE tenant_id = ? AND id = ? AND revoked_at IS NULL",
            (now or utcnow(), tenant_id, device_id),
        )


class SqlOtpRepository(Repository[OtpRecord]):
    table = "otp_challenges"
    record = OtpRecord

    def create(self, rec: OtpRecord) -> OtpRecord:
        return self._insert_new(rec, "OTP id already in use")

    def get(self, otp_id: str) -> OtpRecord | None:
        return self._select_one("id = ?", (otp_id,))

    def get_active_for_session(self, session_id: str, now: datetime) -> OtpRecord | None:
        """The newest OTP of the session that is unexpired, unconsumed and has attempts left."""
        return self._select_one(
            "session_id = ? AND consumed_at IS NULL AND expires_at > ? AND attempts < max_attempts",
            (session_id, now),
            "ORDER BY sent_at DESC, id LIMIT 1",
        )

    def newest_for_session(self, session_id: str) -> OtpRecord | None:
        """The session's newest OTP, live or not (two sent concurrently may both be unconsumed); of
        two sent at the same instant, one still unconsumed with attempts left."""
        return self._select_one(
            "session_id = ?", (session_id,),
            "ORDER BY sent_at DESC, CASE WHEN consumed_at IS NULL AND attempts < max_attempts THEN 0 ELSE 1 END,"
            " id LIMIT 1",
        )

    def void_session(self, session_id: str, now: datetime) -> int:
        """Mark every unconsumed OTP of the session used (one of them just passed)."""
        with self._db.transaction() as s:
            return s.count(
                "UPDATE otp_challenges SET consumed_at = ? WHERE session_id = ? AND consumed_at IS NULL",
                (now, session_id),
            )

    def record_attempt(self, otp_id: str, now: datetime) -> OtpRecord | None:
        """Atomically spend one attempt; None when none is left, or it expired or was consumed."""
        with self._db.transaction() as s:
            return self._returning(
                s,
                "UPDATE otp_challenges SET attempts = attempts + 1 WHERE id = ?"
                " AND consumed_at IS NULL AND expires_at > ? AND attempts < max_attempts",
                (otp_id, now),
            )

    def consume(self, otp_id: str, now: datetime) -> bool:
        """Atomically mark used; True for exactly one caller, and only while unexpired."""
        return self._update_one(
            "UPDATE otp_challenges SET consumed_at = ? WHERE id = ? AND consumed_at IS NULL"
            " AND expires_at > ?",
            (now, otp_id, now),
        )


class SqlAuthSessionRepository(Repository[AuthSessionRecord]):
    table = "auth_sessions"
    record = AuthSessionRecord

    def create(self, rec: AuthSessionRecord) -> AuthSessionRecord:
        return self._insert_new(rec, "session id already in use")

    def get(self, session_id: str) -> AuthSessionRecord | None:
        return self._select_one("id = ?", (session_id,))

    def sealed_after(self, after_id: str, batch: int) -> builtins.list[AuthSessionRecord]:
        """The next ``batch`` stored sessions, expired or not, holding a push confirmation's sealed
        fields, in id order after ``after_id`` (the database picks them: no other session's state is
        sent and parsed)."""
        sealed = ("json_extract(state, '$.push.sealed') IS NOT NULL" if self._db.dialect.name == "sqlite"
                  else "state -> 'push' ->> 'sealed' IS NOT NULL")
        return self._select(f"id > ? AND {sealed}", (after_id,), f"ORDER BY id LIMIT {int(batch)}")

    def update(
        self,
        session_id: str,
        expected_version: int,
        state: Mapping[str, Any],
        expires_at: datetime | None = None,
    ) -> AuthSessionRecord:
        """Write a new state at version+1. Raises ConcurrentUpdateError or NotFoundError."""
        with self._db.transaction() as s:
            updated = self._returning(
                s,
                "UPDATE auth_sessions SET state = ?, expires_at = COALESCE(?, expires_at),"
                " version = version + 1 WHERE id = ? AND version = ?",
                (dict(state), expires_at, session_id, expected_version),
            )
            if updated is not None:
                return updated
            current = s.one("SELECT version FROM auth_sessions WHERE id = ?", (session_id,))
        if current is None:
            raise NotFoundError("no such auth session")
        raise ConcurrentUpdateError(
            f"auth session changed concurrently: at version {current[0]}, not {expected_version}"
        )


class SqlReviewRepository(Repository[ReviewRecord]):
    table = "mfa_reviews"
    record = ReviewRecord

    def create(self, rec: ReviewRecord) -> ReviewRecord:
        """Raises AlreadyExistsError when the session already has a review."""
        return self._insert_new(rec, "the session already has a review")

    def get(self, review_id: str) -> ReviewRecord | None:
        return self._select_one("id = ?", (review_id,))

    def list(
        self, tenant_id: str, status: str, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[ReviewRecord]:
        """Oldest first; ``after`` is the (created_at, id) of the previous page's last review."""
        where, params = "tenant_id = ? AND status = ?", list[Any]([tenant_id, status])
        if after is not None:
            where += " AND (created_at > ? OR (created_at = ? AND id > ?))"
            params += [after[0], after[0], after[1]]
        return self._select(where, params, f"ORDER BY created_at, id LIMIT {int(limit)}")

    def resolve(
        self, review_id: str, status: str, resolved_by: str, note: str, now: datetime | None = None
    ) -> ReviewRecord | None:
        """Compare-and-swap from 'pending'; None when unknown or already resolved."""
        with self._db.transaction() as s:
            return self._returning(
                s,
                "UPDATE mfa_reviews SET status = ?, resolved_by = ?, note = ?, resolved_at = ?"
                " WHERE id = ? AND status = 'pending'",
                (status, resolved_by, note, now or utcnow(), review_id),
            )

    def overdue(
        self, created_before: datetime, limit: int, tenant_id: str | None = None
    ) -> builtins.list[ReviewRecord]:
        """Pending reviews opened before ``created_before``, oldest first."""
        where, params = "status = 'pending' AND created_at <= ?", builtins.list[Any]([created_before])
        if tenant_id is not None:
            where += " AND tenant_id = ?"
            params.append(tenant_id)
        return self._select(where, params, f"ORDER BY created_at, id LIMIT {int(limit)}")


class SqlWebhookOutboxRepository(Repository[WebhookEventRecord]):
    table = "mfa_webhook_outbox"
    record = WebhookEventRecord

    def add(self, rec: WebhookEventRecord) -> WebhookEventRecord:
        return self._insert_new(rec, "webhook event id already in use")

    def get(self, event_id: str) -> WebhookEventRecord | None:
        return self._select_one("id = ?", (event_id,))

    def due(self, now: datetime, limit: int) -> list[WebhookEventRecord]:
        return self._select("next_attempt_at <= ?", (now,), f"ORDER BY next_attempt_at, id LIMIT {int(limit)}")

    def next_due(self) -> datetime | None:
        """When the earliest undelivered event is due."""
        found = self._select("next_attempt_at IS NOT NULL", (), "ORDER BY next_attempt_at LIMIT 1")
        return found[0].next_attempt_at if found else None

    def claim(self, rec: WebhookEventRecord, lease_until: datetime) -> WebhookEventRecord | None:
        """Take the event for one attempt (compare-and-swap on its attempts): None when another
        worker took it first. Until ``lease_until`` no other worker retries it."""
        with self._db.transaction() as s:
            return self._returning(
                s,
                "UPDATE mfa_webhook_outbox SET attempts = attempts + 1, next_attempt_at = ?"
                " WHERE id = ? AND attempts = ? AND next_attempt_at IS NOT NULL",
                (lease_until, rec.id, rec.attempts),
            )

    def settle(self, event_id: str, attempts: int, delivered_at: datetime | None, next_attempt_at: datetime | None,
               error: str) -> bool:
        """The attempt's result: delivered, to retry at ``next_attempt_at``, or abandoned (both None)."""
        return self._update_one(
            "UPDATE mfa_webhook_outbox SET delivered_at = ?, next_attempt_at = ?, last_error = ?"
            " WHERE id = ? AND attempts = ?",
            (delivered_at, next_attempt_at, error, event_id, attempts),
        )


class SqlLockoutRepository(Repository[LockoutRecord]):
    table = "mfa_lockouts"
    record = LockoutRecord

    def get(self, tenant_id: str, scope: str, key: str) -> LockoutRecord | None:
        return self._select_one("tenant_id = ? AND scope = ? AND key = ?", (tenant_id, scope, key))

    def record_failure(
        self, tenant_id: str, scope: str, key: str, subject_id: str, cost: int,
        now: datetime | None = None,
    ) -> LockoutRecord:
        """Atomically add one failure of ``cost``; sets locked_at when the cost reaches LOCK_COST.
        (delete_for_subject forgets the subject's counter and those of devices whose latest
        failure was the subject's: an administrator's unlock, erasure.)"""
        now = now or utcnow()
        first = LockoutRecord(tenant_id, scope, key, subject_id, 1, cost, now,
                              now if cost >= LOCK_COST else None, now)
        with self._db.transaction() as s:
            row = self._returning(
                s,
                insert_sql(self.table, self.record)
                + " ON CONFLICT (tenant_id, scope, key) DO UPDATE SET"
                " subject_id = excluded.subject_id, failures = mfa_lockouts.failures + 1, cost = mfa_lockouts.cost + excluded.cost,"
                " last_failure_at = excluded.last_failure_at, updated_at = excluded.updated_at,"
                " locked_at = CASE WHEN mfa_lockouts.locked_at IS NOT NULL THEN mfa_lockouts.locked_at"
                f" WHEN mfa_lockouts.cost + excluded.cost >= {LOCK_COST} THEN excluded.updated_at"
                " ELSE NULL END",
                values(first),
            )
        assert row is not None
        return row

    def refund(
        self, tenant_id: str, scope: str, key: str, cost: int, failures: int, charged_at: datetime,
        last_before: datetime | None,
    ) -> LockoutRecord | None:
        """Give back ``cost`` (and ``failures``) charged at ``charged_at``: a lock that charge set is
        lifted when the cost falls below LOCK_COST, and with ``failures`` the time of the last
        failure goes back to ``last_before`` unless a later failure moved it."""
        with self._db.transaction() as s:
            return self._returning(
                s,
                "UPDATE mfa_lockouts SET cost = CASE WHEN cost > ? THEN cost - ? ELSE 0 END,"
                " failures = CASE WHEN failures > ? THEN failures - ? ELSE 0 END,"
                " locked_at = CASE WHEN locked_at = ? AND cost - ? < ? THEN NULL ELSE locked_at END,"
                " last_failure_at = CASE WHEN ? > 0 AND last_failure_at = ? THEN ? ELSE last_failure_at END"
                " WHERE tenant_id = ? AND scope = ? AND key = ?",
                (cost, cost, failures, failures, charged_at, cost, LOCK_COST, failures, charged_at, last_before,
                 tenant_id, scope, key),
            )

    def trim_devices(self, tenant_id: str, subject_id: str, keep: int) -> tuple[int, int]:
        """Forget the device counters whose latest failure was the subject's beyond its ``keep``
        newest, except those of devices bound in the tenant (to anyone: a counter moves to the
        subject of its latest failure) -> (how many were forgotten, how many of those were locked)."""
        with self._db.transaction() as s:
            rows = s.all(
                "DELETE FROM mfa_lockouts WHERE tenant_id = ? AND scope = 'device' AND subject_id = ?"
                " AND NOT EXISTS (SELECT 1 FROM devices d WHERE d.tenant_id = mfa_lockouts.tenant_id"
                " AND d.fingerprint = mfa_lockouts.key AND d.revoked_at IS NULL)"
                " AND key NOT IN (SELECT l.key FROM mfa_lockouts l WHERE l.tenant_id = ? AND l.scope = 'device'"
                " AND l.subject_id = ? ORDER BY l.updated_at DESC, l.key LIMIT ?) RETURNING locked_at",
                (tenant_id, subject_id, tenant_id, subject_id, keep),
            )
            return len(rows), sum(locked_at is not None for (locked_at,) in rows)

    def reset(self, tenant_id: str, scope: str, key: str, locked_at: datetime | None = None) -> bool:
        """Forget the counter (a success); with ``locked_at``, only while it still holds that lock
        (a lapsed lock, not the failures charged since another call forgot it)."""
        where, params = "tenant_id = ? AND scope = ? AND key = ?", list[Any]([tenant_id, scope, key])
        if locked_at is not None:
            where += " AND locked_at = ?"
            params.append(locked_at)
        with self._db.transaction() as s:
            return s.count(f"DELETE FROM mfa_lockouts WHERE {where}", tuple(params)) == 1


class SqlSubjectSignalRepository(Repository[SubjectSignalRecord]):
    table = "mfa_subject_signals"
    record = SubjectSignalRecord

    def get(self, tenant_id: str, subject_id: str) -> SubjectSignalRecord | None:
        return self._select_one("tenant_id = ? AND subject_id = ?", (tenant_id, subject_id))

    def put(self, rec: SubjectSignalRecord) -> None:
        with self._db.transaction() as s:
            s.execute(
                insert_sql(self.table, self.record)
                + " ON CONFLICT (tenant_id, subject_id) DO UPDATE SET country = excluded.country,"
                " latitude = excluded.latitude, longitude = excluded.longitude,"
                " seen_at = excluded.seen_at",
                values(rec),
            )

    def _ensure(self, s, tenant_id: str, subject_id: str, now: datetime) -> None:
        """A row to mark, for a subject no ALLOW has placed yet (country unknown: "")."""
        s.execute(
            "INSERT INTO mfa_subject_signals (tenant_id, subject_id, country, seen_at) VALUES (?, ?, '', ?)"
            " ON CONFLICT (tenant_id, subject_id) DO NOTHING",
            (tenant_id, subject_id, now),
        )

    def flag(self, tenant_id: str, subject_id: str, reason: str, now: datetime) -> None:
        with self._db.transaction() as s:
            self._ensure(s, tenant_id, subject_id, now)
            s.execute(
                "UPDATE mfa_subject_signals SET flagged_at = ?, flag_reason = ? WHERE tenant_id = ? AND subject_id = ?",
                (now, reason, tenant_id, subject_id),
            )

    def phone_changed(self, tenant_id: str, subject_id: str, now: datetime) -> None:
        with self._db.transaction() as s:
            self._ensure(s, tenant_id, subject_id, now)
            s.execute(
                "UPDATE mfa_subject_signals SET phone_changed_at = ? WHERE tenant_id = ? AND subject_id = ?",
                (now, tenant_id, subject_id),
            )
