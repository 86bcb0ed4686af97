"""The SQL storage: opens SQLite or PostgreSQL from a DSN, migrates it, and holds the repositories of
the shared tables; a service attaches its own tables (a :class:`StoragePart`) to the same database."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .audit import SqlAuditRepository
from .challenges import SqlChallengeRepository
from .db import Database, PostgresDatabase, SqliteDatabase, utcnow
from .errors import StillReferencedError, StorageError
from .interfaces import ErasureCounts
from .migrate import UNLIMITED, MigrationLimits, SchemaPart, migrate
from .rate_limits import SqlRateLimitRepository
from .retention import Expiry
from .subjects import SqlSubjectRepository
from .templates import SqlTemplateRepository

if TYPE_CHECKING:
    from services.common.config import RetentionConfig, StorageConfig

P = TypeVar("P")


@dataclass(frozen=True)
class StoragePart(Generic[P]):
    """A service's own tables: their migrations, and what builds the service's repositories on the
    storage's database (so that they share its transactions)."""

    schema: SchemaPart
    open: Callable[[Database], P]


class SqlStorage:
    def __init__(self, db: Database, limits: MigrationLimits = UNLIMITED) -> None:
        self.db = db
        self._limits = limits
        self.templates = SqlTemplateRepository(db)
        self.subjects = SqlSubjectRepository(db)
        self.rate_limits = SqlRateLimitRepository(db)
        self.challenges = SqlChallengeRepository(db)
        self.audit = SqlAuditRepository(db)
        self._parts: dict[str, Any] = {}
        self._parts_lock = threading.Lock()

    def attach(self, part: StoragePart[P]) -> P:
        """The part's repositories; its migrations run at the first attach of this storage."""
        with self._parts_lock:
            found = self._parts.get(part.schema.name)
            if found is None:
                migrate(self.db, part.schema, self._limits)
                found = self._parts[part.schema.name] = part.open(self.db)
            return found

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

    def exclusive(self, name: str, what: str) -> AbstractContextManager[None]:
        return self.db.exclusive(name, what)

    def erase_subject(self, tenant_id: str, subject_id: str) -> ErasureCounts:
        """The subject's shared record: consents, contact, challenges and the subject row. Templates
        are the modality services' to erase, a service's own tables its own (first: they refer to
        the subject row); a template left is StillReferencedError and nothing is erased."""
        with self.db.transaction() as s:
            left = s.one(
                "SELECT COUNT(*) FROM templates WHERE tenant_id = ? AND subject_id = ?", (tenant_id, subject_id)
            )[0]
            if left:
                raise StillReferencedError(
                    f"the subject still has {left} template(s); the face and voice services erase them"
                )
            phone = s.one(
                "SELECT phone_envelope IS NOT NULL FROM subjects WHERE tenant_id = ? AND subject_id = ?",
                (tenant_id, subject_id),
            )
            counts = ErasureCounts(
                challenges=self.challenges.delete_for_subject(tenant_id, subject_id),
                consents=self.subjects.delete_for_subject(tenant_id, subject_id),
                contact_erased=bool(phone and phone[0]),
            )
            s.execute(
                "DELETE FROM subjects WHERE tenant_id = ? AND subject_id = ?", (tenant_id, subject_id)
            )
        return counts

    def audited_rows(self) -> dict[str, int]:
        """Rows of the shared tables that are only ever written together with an audit record:
        where any exist, the audit trail cannot be empty."""
        with self.db.read() as s:
            return {
                "templates": s.one("SELECT COUNT(*) FROM templates")[0],
                "consents": s.one("SELECT COUNT(*) FROM consents")[0],
                "phone numbers": s.one("SELECT COUNT(*) FROM subjects WHERE phone_envelope IS NOT NULL")[0],
            }

    def expiries(self, cfg: RetentionConfig, now: datetime | None = None) -> list[Expiry]:
        """The shared tables' rows past their retention at ``now``: challenges and rate-limit
        windows (the audit trail is never purged; subjects, consents and templates go with erasure)."""
        now = now or utcnow()
        return [
            Expiry("challenges", "challenges", "expires_at <= ?", (now - timedelta(seconds=cfg.challenges_s),),
                   key="nonce", order="expires_at"),
            Expiry("rate_limit_windows", "rate_limits", "window_end <= ?",
                   (int(now.timestamp()) - cfg.rate_limits_s,), key="key", order="window_end"),
        ]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SqlStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_storage(dsn: str, config: StorageConfig | None = None) -> SqlStorage:
    """Open (and migrate) the storage named by ``dsn``: ``sqlite:///<path>`` or ``postgresql://...``.

    ``config`` supplies pool size and timeouts (``Settings.storage``); defaults otherwise, and
    migrations that wait without limit.
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
    limits = MigrationLimits(config.migration_lock_wait_s, config.migration_lock_timeout_s) if config else UNLIMITED
    try:
        migrate(db, limits=limits)
    except BaseException:
        db.close()
        raise
    return SqlStorage(db, limits)
