"""Schema migrations: numbered SQL files per schema part and dialect, applied in order, each once.

The shared tables (this package) and each service's own tables (a :class:`SchemaPart` the service
attaches to the storage) have their own files, ``<package>/migrations/<dialect>/NNNN_name.sql``
numbered 0001.. without gaps, recorded in ``schema_versions`` by (part, version) with the file's
SHA-256; an applied file that was edited afterwards is refused. A part's pending files are applied
in one transaction (but for the PostgreSQL files below) under the migration lock (PostgreSQL advisory
lock; SQLite BEGIN IMMEDIATE), so processes opening the same database at once apply each file
exactly once.

A PostgreSQL file whose header has the line ``-- biogate: no-transaction`` runs outside any
transaction, one statement at a time, each committing on its own: what ``CREATE INDEX
CONCURRENTLY`` needs, which builds an index on a live table without holding its writers (a plain
``CREATE INDEX`` holds every INSERT, UPDATE and DELETE on the table until it is built). PostgreSQL
migrations therefore run on a connection holding the migration lock as a session advisory lock, and
record such a file once all its statements have succeeded. A file that failed part way is run again
whole: the loader allows only statements that are re-runnable (``CREATE INDEX CONCURRENTLY IF NOT
EXISTS``, ``DROP INDEX CONCURRENTLY IF EXISTS``); the INVALID index a failed concurrent
build leaves behind is dropped before the statement that builds it runs again. SQLite files always
run in the part's one transaction.

The PostgreSQL files that shipped before the directive build their indexes with a plain ``CREATE
INDEX``; they may not change, so an operator can build such an index beforehand with ``CREATE
INDEX CONCURRENTLY`` under the same name: a valid index of that name on that table is kept, and
the statement skipped (README, "Upgrading a large PostgreSQL database").

Databases created before the schema was split into parts recorded one history of one set of files
in ``schema_migrations``. A file whose header has the line ``-- legacy: NNNN_name`` holds (part
of) what that old migration created: where the old history records it, the file is recorded as
applied without running.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

from .db import Database, HeldConnection, PostgresDatabase, Session, utcnow
from .errors import LockHeldError, MigrationError, StorageError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LEGACY = re.compile(r"^-- legacy: (\d{4})_([a-z0-9_]+)\s*$", re.MULTILINE)
_NO_TRANSACTION = re.compile(r"^-- biogate: no-transaction\s*$", re.MULTILINE)
_PLAIN_INDEX = re.compile(r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(\w+)\s+ON\s+(?:ONLY\s+)?(\w+)\b", re.IGNORECASE)
_CONCURRENT_INDEX = re.compile(
    r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE
)
_CONCURRENT_DROP = re.compile(r"^DROP\s+INDEX\s+CONCURRENTLY\s+(IF\s+EXISTS\s+)?(\w+)$", re.IGNORECASE)
HISTORY = "schema_versions"
LEGACY_HISTORY = "schema_migrations"


@dataclass(frozen=True)
class SchemaPart:
    """A set of tables with its own migrations: ``name`` in the history, ``package`` holding
    ``migrations/<dialect>/``."""

    name: str
    package: str


SHARED = SchemaPart("shared", __package__)


@dataclass(frozen=True)
class MigrationLimits:
    """How long PostgreSQL migrations wait (``storage.migration_lock_wait_s`` and
    ``storage.migration_lock_timeout_s``); 0: without limit."""

    lock_wait_s: float = 0.0  # for the migration lock, held by another migrator
    lock_timeout_s: float = 0.0  # lock_timeout of the transactional files' statements


UNLIMITED = MigrationLimits()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def legacy(self) -> tuple[int, str] | None:
        m = _LEGACY.search(self.sql)
        return (int(m.group(1)), m.group(2)) if m else None

    @property
    def transactional(self) -> bool:
        return _NO_TRANSACTION.search(self.sql) is None


def statements(sql: str) -> list[str]:
    """The file's statements, without comments: split at each ``;`` outside quotes."""
    found, stmt, quote, i = [], "", "", 0
    while i < len(sql):
        c = sql[i]
        if quote:
            stmt += c
            quote = "" if c == quote else quote
        elif c in "'\"":
            stmt, quote = stmt + c, c
        elif sql.startswith("--", i):
            i = sql.find("\n", i)
            if i < 0:
                break
            continue
        elif c == "$":
            raise MigrationError("a statement-by-statement migration cannot hold dollar-quoted text")
        elif c == ";":
            found.append(stmt.strip())
            stmt = ""
        else:
            stmt += c
        i += 1
    if quote or stmt.strip():
        raise MigrationError(f"unterminated SQL statement in migration: {stmt.strip()[:80]!r}")
    return [st for st in found if st]


def _check(mig: Migration, dialect: str, part: SchemaPart) -> None:
    what = f"{part.name} migration {mig.version:04d}_{mig.name} ({dialect})"
    if mig.transactional:
        return
    if dialect != "postgres":
        raise MigrationError(f"{what}: only PostgreSQL files may run outside a transaction; remove the "
                             "'-- biogate: no-transaction' line")
    if mig.legacy is not None:
        raise MigrationError(f"{what}: a file adopted from the legacy history runs in a transaction")
    for stmt in statements(mig.sql):
        m = _CONCURRENT_INDEX.match(stmt)
        if m and not m.group(1):
            raise MigrationError(f"{what}: write CREATE INDEX CONCURRENTLY IF NOT EXISTS {m.group(2)}, so that "
                                 "a run again after a failure skips the indexes it had built")
        d = _CONCURRENT_DROP.match(stmt)
        if d and not d.group(1):
            raise MigrationError(f"{what}: write DROP INDEX CONCURRENTLY IF EXISTS {d.group(2)}, so that "
                                 "a run again after a failure skips the indexes it had dropped")
        if not m and not d:
            raise MigrationError(
                f"{what}: a file that runs outside a transaction is run again whole after a failure, so each of "
                "its statements must be re-runnable: CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS, or DROP "
                f"INDEX CONCURRENTLY IF EXISTS of one index; put {stmt[:80]!r} in a file without the directive")


def load_migrations(dialect: str, part: SchemaPart = SHARED) -> list[Migration]:
    folder = resources.files(part.package).joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        m = _NAME.fullmatch(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    for mig in found:
        _check(mig, dialect, part)
    versions = [mig.version for mig in found]
    if not found or versions != list(range(1, len(found) + 1)):
        raise MigrationError(
            f"{part.name} migrations for {dialect} must be numbered 0001.. without gaps: {versions}"
        )
    return found


def _legacy_history(db: Database, s: Session) -> set[tuple[int, str]]:
    if not db.has_table(s, LEGACY_HISTORY):
        return set()
    return {(int(v), str(n)) for v, n in s.all(f"SELECT version, name FROM {LEGACY_HISTORY}")}


def _pending(db: Database, s: Session, part: SchemaPart, migrations: list[Migration]
             ) -> list[tuple[Migration, bool]]:
    """The part's migrations not applied yet, each with whether the legacy history holds it."""
    s.execute(
        f"CREATE TABLE IF NOT EXISTS {HISTORY} ("
        " part TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,"
        " checksum TEXT NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (part, version))"
    )
    applied = dict(s.all(f"SELECT version, checksum FROM {HISTORY} WHERE part = ?", (part.name,)))
    legacy: set[tuple[int, str]] | None = None
    pending = []
    for mig in migrations:
        if mig.version in applied:
            if applied[mig.version] != mig.checksum:
                raise MigrationError(
                    f"{part.name} migration {mig.version:04d}_{mig.name} was changed after it was applied"
                )
            continue
        if mig.legacy is not None:
            legacy = _legacy_history(db, s) if legacy is None else legacy
        pending.append((mig, legacy is not None and mig.legacy in legacy))
    return pending


def _record(s: Session, part: SchemaPart, mig: Migration) -> None:
    s.execute(
        f"INSERT INTO {HISTORY} (part, version, name, checksum, applied_at) VALUES (?, ?, ?, ?, ?)",
        (part.name, mig.version, mig.name, mig.checksum, utcnow().isoformat()),
    )


def _prebuilt(s: Session, stmt: str, what: str) -> bool:
    """Whether ``stmt`` is a plain CREATE INDEX whose index an operator built beforehand, valid and
    on the same table (README, "Upgrading a large PostgreSQL database")."""
    m = _PLAIN_INDEX.match(stmt)
    if m is None:
        return False
    found = s.one("SELECT i.indisvalid, i.indrelid = to_regclass(?), pg_get_indexdef(i.indexrelid) FROM pg_index i"
                  " WHERE i.indexrelid = to_regclass(?)", (m.group(2), m.group(1)))
    if found is None or not found[1]:
        return False  # none, or one on another table: the statement says what is wrong
    if not found[0]:
        raise MigrationError(f"{what}: the index {m.group(1)} built beforehand is INVALID (its concurrent build "
                             f"failed): DROP INDEX CONCURRENTLY {m.group(1)}, then build it again or let the "
                             "migration build it")
    log.warning("%s: keeping the index built beforehand: %s", what, found[2])
    return True


def _apply(s: Session, part: SchemaPart, mig: Migration, adopt: bool, done: list[int], adopted: list[int]) -> None:
    """Run a transactional file in ``s`` (or only record it, adopted from the legacy history)."""
    if not adopt and s.dialect.name == "postgres" and "$" not in mig.sql:
        for stmt in statements(mig.sql):
            if not _prebuilt(s, stmt, f"{part.name} migration {mig.version:04d}_{mig.name}"):
                s.script(stmt)
    elif not adopt:
        s.script(mig.sql)
    _record(s, part, mig)
    done.append(mig.version)
    if adopt:
        adopted.append(mig.version)


def _run_outside_transaction(held: HeldConnection, mig: Migration) -> None:
    with held.autocommit() as s:
        for stmt in statements(mig.sql):
            m = _CONCURRENT_INDEX.match(stmt)
            if m:
                valid = s.one("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(?)",
                              (m.group(2),))
                if valid is not None and not valid[0]:
                    log.warning("dropping the index %s that an earlier failed concurrent build left INVALID",
                                m.group(2))
                    s.execute(f"DROP INDEX CONCURRENTLY {m.group(2)}")
            s.script(stmt)


@contextmanager
def _bounded(held: HeldConnection, limits: MigrationLimits) -> Iterator[Session]:
    """A transaction whose statements wait at most ``limits.lock_timeout_s`` for a table's lock: an
    ALTER TABLE queued behind a long query would hold every later query of the table behind it."""
    with held.transaction() as s:
        if limits.lock_timeout_s:
            s.execute("SELECT set_config('lock_timeout', ?, true)", (f"{max(1, round(limits.lock_timeout_s * 1000))}ms",))
        yield s


def _migrate_held(db: PostgresDatabase, held: HeldConnection, part: SchemaPart, migrations: list[Migration],
                  limits: MigrationLimits) -> tuple[list[int], list[int]]:
    done: list[int] = []
    adopted: list[int] = []
    with _bounded(held, limits) as s:
        pending = _pending(db, s, part, migrations)
    while pending:
        if not pending[0][0].transactional:
            mig, _ = pending.pop(0)
            if db.in_transaction():  # the build would wait for the caller's own transaction, forever
                raise MigrationError(f"{part.name} migration {mig.version:04d}_{mig.name} runs outside any "
                                     "transaction: apply it with `biogate migrate`, not inside one")
            # Without lock_timeout: a concurrent build waits for older transactions by design, and
            # its SHARE UPDATE EXCLUSIVE lock lets the table's reads and writes through meanwhile.
            _run_outside_transaction(held, mig)
            with _bounded(held, limits) as s:
                _record(s, part, mig)
            done.append(mig.version)
            continue
        batch: list[Migration] = []
        try:
            with _bounded(held, limits) as s:  # the transactional files up to the next one that is not, together
                while pending and pending[0][0].transactional:
                    batch.append(pending[0][0])
                    _apply(s, part, *pending.pop(0), done, adopted)
        except StorageError as exc:
            if exc.sqlstate != "55P03" or not batch:
                raise
            mig = batch[-1]
            raise MigrationError(
                f"{part.name} migration {mig.version:04d}_{mig.name} waited more than {limits.lock_timeout_s:g} s "
                "(storage.migration_lock_timeout_s) for a lock on a table it changes, held by a long query or "
                f"transaction; nothing of {', '.join(f'{m.version:04d}' for m in batch)} was applied: run "
                "`biogate migrate` again in a quieter moment, or raise storage.migration_lock_timeout_s"
            ) from None
    return done, adopted


def _migrate_postgres(db: PostgresDatabase, part: SchemaPart, migrations: list[Migration],
                      limits: MigrationLimits) -> tuple[list[int], list[int]]:
    try:
        with db.held(HISTORY, "schema migrations", limits.lock_wait_s) as held:
            return _migrate_held(db, held, part, migrations, limits)
    except LockHeldError as exc:
        raise MigrationError(
            f"waited {limits.lock_wait_s:g} s for the schema migration lock of {part.name}, held by {exc.holder}: "
            "another process is migrating this database (an index build on a large table can take hours); "
            "start again once it is done (`biogate migrate`, the migrate Job), or raise "
            "storage.migration_lock_wait_s (0: wait without limit)"
        ) from None


def migrate(db: Database, part: SchemaPart = SHARED, limits: MigrationLimits = UNLIMITED) -> list[int]:
    """Apply the part's pending migrations; returns the versions applied (or adopted) by this call.
    ``limits`` bound the waits on PostgreSQL (SQLite waits for its write lock ``storage.timeout_s``)."""
    migrations = load_migrations(db.dialect.name, part)
    if isinstance(db, PostgresDatabase):
        done, adopted = _migrate_postgres(db, part, migrations, limits)
    else:
        done, adopted = [], []
        with db.transaction() as s:
            db.lock(s, HISTORY)
            for mig, adopt in _pending(db, s, part, migrations):
                _apply(s, part, mig, adopt, done, adopted)
    if done:
        log.info("schema migrations of %s: %s (recorded from the legacy history: %s; %s)",
                 part.name, done, adopted, db.dialect.name)
    return done
