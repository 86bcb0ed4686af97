"""The SQL storage: opens SQLite or PostgreSQL from a DSN, migrates it, and holds the repositories."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .audit import SqlAuditRepository
from .auth_sessions import SqlAuthSessionRepository
from .challenges import SqlChallengeRepository
from .db import Database, PostgresDatabase, SqliteDatabase, utcnow
from .devices import SqlDeviceRepository
from .errors import StorageError
from .interfaces import ErasureCounts
from .mfa_tables import SqlLockoutRepository, SqlReviewRepository, SqlSubjectSignalRepository
from .migrate import migrate
from .otp import SqlOtpRepository
from .rate_limits import SqlRateLimitRepository
from .subjects import SqlSubjectRepository
from .templates import SqlTemplateRepository

if TYPE_CHECKING:
    from services.common.config import StorageConfig


class SqlStorage:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.templates = SqlTemplateRepository(db)
        self.subjects = SqlSubjectRepository(db)
        self.devices = SqlDeviceRepository(db)
        self.otp = SqlOtpRepository(db)
        self.rate_limits = SqlRateLimitRepository(db)
        self.auth_sessions = SqlAuthSessionRepository(db)
        self.challenges = SqlChallengeRepository(db)
        self.audit = SqlAuditRepository(db)
        self.reviews = SqlReviewRepository(db)
        self.lockouts = SqlLockoutRepository(db)
        self.subject_signals = SqlSubjectSignalRepository(db)

    @property
    def dialect(self) -> str:
        return self.db.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[SqlStorage]:
        """One transaction for every repository call made in the block by this thread.

        Nested blocks join the outer transaction; an exception rolls everything back. Threads
        started inside the block are not part of it (and on SQLite wait for it to end).
        """
        with self.db.transaction():
            yield self

    def erase_subject(self, tenant_id: str, subject_id: str) -> ErasureCounts:
        with self.db.transaction() as s:
            phone = s.one(
                "SELECT phone_envelope IS NOT NULL FROM subjects WHERE tenant_id = ? AND subject_id = ?",
                (tenant_id, subject_id),
            )
            counts = ErasureCounts(
                templates=self.templates.delete_for_subject(tenant_id, subject_id),
                devices=self.devices.delete_for_subject(tenant_id, subject_id),
                otp=self.otp.delete_for_subject(tenant_id, subject_id),
                sessions=self.auth_sessions.delete_for_subject(tenant_id, subject_id),
                challenges=self.challenges.delete_for_subject(tenant_id, subject_id),
                consents=self.subjects.delete_for_subject(tenant_id, subject_id),
                contact_erased=bool(phone and phone[0]),
            )
            for repo in (self.reviews, self.lockouts, self.subject_signals):
                repo.delete_for_subject(tenant_id, subject_id)
            s.execute(
                "DELETE FROM subjects WHERE tenant_id = ? AND subject_id = ?", (tenant_id, subject_id)
            )
        return counts

    def purge_expired(self, now: datetime | None = None) -> int:
        now = now or utcnow()
        with self.db.transaction() as s:
            n = 0
            for table in ("otp_challenges", "auth_sessions", "challenges"):
                n += s.count(f"DELETE FROM {table} WHERE expires_at <= ?", (now,))
            n += s.count("DELETE FROM rate_limits WHERE window_end <= ?", (int(now.timestamp()),))
        return n

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SqlStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_storage(dsn: str, config: StorageConfig | None = None) -> SqlStorage:
    """Open (and migrate) the storage named by ``dsn``: ``sqlite:///<path>`` or ``postgresql://...``.

    ``config`` supplies pool size and timeouts (``Settings.storage``); defaults otherwise.
    """
    pool_size = config.pool_size if config else 8
    timeout_s = config.timeout_s if config else 10.0
    if dsn.startswith("sqlite:///"):
        path = dsn[len("sqlite:///"):]
        if not path or path == ":memory:":
            raise StorageError("SQLite storage needs a file path (sqlite:///<path>)")
        synchronous = config.sqlite_synchronous if config else "FULL"
        db: Database = SqliteDatabase(Path(path).expanduser(), pool_size, timeout_s, synchronous)
    elif dsn.startswith(("postgresql://", "postgres://")):
        db = PostgresDatabase(dsn, pool_size, timeout_s)
    else:
        raise StorageError("storage DSN must start with sqlite:/// or postgresql://")
    try:
        migrate(db)
    except BaseException:
        db.close()
        raise
    return SqlStorage(db)
