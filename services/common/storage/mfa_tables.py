"""SQL repositories of the MFA orchestrator's tables: reviews, lockouts, subject signals."""

from __future__ import annotations

from datetime import datetime

from .db import utcnow
from .mfa_records import LockoutRecord, ReviewRecord, SubjectSignalRecord
from .repository import Repository
from .rows import insert_sql, values

LOCK_COST = 1000


class SqlReviewRepository(Repository[ReviewRecord]):
    table = "mfa_reviews"
    record = ReviewRecord

    def create(self, rec: ReviewRecord) -> ReviewRecord:
        return self._insert_new(rec, "the session already has a review")

    def get(self, review_id: str) -> ReviewRecord | None:
        return self._select_one("id = ?", (review_id,))

    def list(
        self, tenant_id: str, status: str, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[ReviewRecord]:
        where, params = "tenant_id = ? AND status = ?", [tenant_id, status]
        if after is not None:
            where += " AND (created_at > ? OR (created_at = ? AND id > ?))"
            params += [after[0], after[0], after[1]]
        return self._select(where, params, f"ORDER BY created_at, id LIMIT {int(limit)}")

    def resolve(
        self, review_id: str, status: str, resolved_by: str, note: str, now: datetime | None = None
    ) -> ReviewRecord | None:
        with self._db.transaction() as s:
            return self._returning(
                s,
                "UPDATE mfa_reviews SET status = ?, resolved_by = ?, note = ?, resolved_at = ?"
                " WHERE id = ? AND status = 'pending'",
                (status, resolved_by, note, now or utcnow(), review_id),
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

    def reset(self, tenant_id: str, scope: str, key: str) -> bool:
        with self._db.transaction() as s:
            return s.count(
                "DELETE FROM mfa_lockouts WHERE tenant_id = ? AND scope = ? AND key = ?",
                (tenant_id, scope, key),
            ) == 1


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
