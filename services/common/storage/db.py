"""Connections and transactions for SQLite and PostgreSQL behind one small interface.

Repositories write SQL once, with ``?`` placeholders, and run it on a :class:`Session`; the
session translates placeholders and values for its dialect. A write transaction opened with
:meth:`Database.transaction` is ambient for the current thread (or asyncio task): every
repository call made inside it joins it instead of opening its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from services.common.files import private_file

from .errors import LockHeldError, StorageError

log = logging.getLogger(__name__)

# SQLite has no timestamp type: UTC text of fixed width, so that text order is time order.
_SQLITE_TS = "%Y-%m-%d %H:%M:%S.%f+00:00"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def from_json(value: Any) -> Any:
    """JSON column value: text from SQLite, already decoded from PostgreSQL's jsonb."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def from_ts(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(timezone.utc)


class Dialect:
    def __init__(self, name: str) -> None:
        self.name = name

    @functools.lru_cache(maxsize=512)  # noqa: B019  (two module-level dialects live for the process)
    def sql(self, query: str) -> str:
        if self.name == "sqlite":
            return query
        return query.replace("%", "%%").replace("?", "%s")

    def value(self, v: Any) -> Any:
        if isinstance(v, datetime):
            if v.tzinfo is None:
                raise ValueError("naive datetime given to the storage; use a timezone-aware UTC time")
            v = v.astimezone(timezone.utc)
            return v.strftime(_SQLITE_TS) if self.name == "sqlite" else v
        if isinstance(v, (dict, list, tuple)):
            return to_json(v)
        return v


SQLITE = Dialect("sqlite")
POSTGRES = Dialect("postgres")


class Session:
    """One connection inside one transaction: the only object repositories run SQL on."""

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self._conn = conn
        self.dialect = dialect

    def execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(self.dialect.sql(query), [self.dialect.value(p) for p in params])

    def one(self, query: str, params: Sequence[Any] = ()) -> Any:
        rows = self.execute(query, params).fetchall()
        return rows[0] if rows else None

    def all(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.execute(query, params).fetchall()

    def count(self, query: str, params: Sequence[Any] = ()) -> int:
        """Rows changed by an INSERT, UPDATE or DELETE."""
        return self.execute(query, params).rowcount

    def script(self, sql: str) -> None:
        """Run a migration file: several statements, no parameters."""
        if self.dialect.name != "sqlite":
            self._conn.execute(sql)
            return
        # executescript() would COMMIT first; run the statements one by one inside the transaction.
        stmt = ""
        for line in sql.splitlines(keepends=True):
            stmt += line
            if sqlite3.complete_statement(stmt):
                self._conn.execute(stmt)
                stmt = ""
        if any(ln.strip() and not ln.strip().startswith("--") for ln in stmt.splitlines()):
            raise StorageError(f"unterminated SQL statement in migration: {stmt[:80]!r}")


class Database(ABC):
    dialect: Dialect

    def __init__(self) -> None:
        self._active: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
            f"biogate_storage_tx_{id(self)}", default=None
        )
        self._exclusive_held = threading.local()

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Session]:
        """A transaction, or the ambient one when this thread is already inside a write transaction.

        Write transactions are serialised against other writers on SQLite (BEGIN IMMEDIATE), so a
        read-then-write inside one never fails on a lock upgrade.
        """
        active = self._active.get()
        if active is not None:
            yield active
            return
        with self._begin(write) as session:
            if not write:
                yield session
                return
            token = self._active.set(session)
            try:
                yield session
            finally:
                self._active.reset(token)

    def in_transaction(self) -> bool:
        """Whether this thread (or task) is inside a write transaction that repository calls join."""
        return self._active.get() is not None

    def read(self) -> AbstractContextManager[Session]:
        return self.transaction(write=False)

    @abstractmethod
    def _begin(self, write: bool) -> Any: ...

    @abstractmethod
    def lock(self, session: Session, name: str) -> None:
        """Serialise this transaction against others taking the same lock, until it ends."""

    @contextmanager
    def exclusive(self, name: str, what: str) -> Iterator[None]:
        """Hold the lock ``name`` for the whole block, across any number of transactions, or raise
        :class:`LockHeldError` at once (naming the holder's ``what``, pid and host) when another
        connection or process holds it. Not a transaction: others keep reading and writing.

        Held by the connection (PostgreSQL, a session advisory lock) or the open file (SQLite,
        ``flock`` on a file beside the database), so a process that dies releases it. Re-entrant
        within one thread.
        """
        held: set[str] = self._exclusive_held.__dict__.setdefault("names", set())
        if name in held:
            yield
            return
        holder = f"{what}, pid {os.getpid()} on {socket.gethostname()}"
        with self._exclusive(name, holder):
            held.add(name)
            try:
                yield
            finally:
                held.discard(name)

    @abstractmethod
    def _exclusive(self, name: str, holder: str) -> AbstractContextManager[None]: ...

    @abstractmethod
    def has_table(self, session: Session, name: str) -> bool:
        """Whether the table exists (in the schema the connection works in)."""

    @abstractmethod
    def close(self) -> None: ...


class SqliteDatabase(Database):
    dialect = SQLITE

    def __init__(self, path: Path, pool_size: int, timeout_s: float, synchronous: str) -> None:
        super().__init__()
        self.path = path
        self._timeout_s = timeout_s
        self._synchronous = synchronous
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite creates a database 0644 whatever the umask, and its -wal and -shm files with the
        # database's own mode: made 0600 first, all three stay private.
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if f == path or f.exists():
                private_file(f)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), timeout=self._timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise StorageError(f"SQLite at {self.path} refused WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def _begin(self, write: bool) -> Iterator[Session]:
        if self._closed:
            raise StorageError("storage is closed")
        if not self._slots.acquire(timeout=self._timeout_s):
            raise StorageError("no free SQLite connection within the timeout")
        conn: sqlite3.Connection | None = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Session(conn, self.dialect)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite error: {exc}") from exc
        finally:
            if conn is not None:
                if self._closed or conn.in_transaction:
                    conn.close()
                else:
                    self._idle.put(conn)
            self._slots.release()

    def lock(self, session: Session, name: str) -> None:
        pass  # BEGIN IMMEDIATE already holds the database's single write lock

    @contextmanager
    def _exclusive(self, name: str, holder: str) -> Iterator[None]:
        # SQLite's own locks last one transaction; a lock file beside the database (the same host:
        # SQLite in WAL mode is never shared across hosts) lasts as long as its open descriptor.
        path = private_file(self.path.with_name(f"{self.path.name}.{name}.lock"))
        fd = os.open(path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockHeldError(name, os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                                    or "another process") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder}, since {utcnow():%Y-%m-%d %H:%M:%S} UTC".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock

    def has_table(self, session: Session, name: str) -> bool:
        return session.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


_LOCK_CHANNEL = "biogate_lock_released"


class HeldConnection:
    """A PostgreSQL connection holding a lock of :meth:`PostgresDatabase.held`."""

    def __init__(self, db: PostgresDatabase, conn: Any) -> None:
        self._db, self._conn = db, conn

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._db._mapped_errors(), self._conn.transaction():
            yield Session(self._conn, self._db.dialect)

    @contextmanager
    def autocommit(self) -> Iterator[Session]:
        """Each statement run on the session commits on its own (what CREATE INDEX CONCURRENTLY needs)."""
        with self._db._mapped_errors():
            yield Session(self._conn, self._db.dialect)


class PostgresDatabase(Database):
    dialect = POSTGRES

    def __init__(self, dsn: str, pool_size: int, timeout_s: float) -> None:
        super().__init__()
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._errors = (psycopg.Error, PoolTimeout)
        self._dsn, self._timeout_s = dsn, timeout_s
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            timeout=timeout_s,
            kwargs={"autocommit": True},
            check=ConnectionPool.check_connection,  # a server restart costs no failed request
            open=False,
            name="biogate-storage",
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except Exception as exc:
            self._pool.close()
            raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc

    @contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            # Only the primary message, and no chained cause: the DETAIL of a constraint error
            # quotes the row's values (subject ids, envelopes), which must not reach the logs.
            diag = getattr(exc, "diag", None)
            message = (diag and diag.message_primary) or type(exc).__name__
            sqlstate = getattr(exc, "sqlstate", None) or "-"
            error = StorageError(f"PostgreSQL error {sqlstate}: {message}")
            error.sqlstate = getattr(exc, "sqlstate", None)
            raise error from None

    @contextmanager
    def _begin(self, write: bool) -> Iterator[Session]:
        with self._mapped_errors(), self._pool.connection() as conn, conn.transaction():
            yield Session(conn, self.dialect)

    def lock(self, session: Session, name: str) -> None:
        # Keyed by schema too, so that separate schemas (tests, tenants) never wait on each other.
        session.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema()), hashtext(?))", (name,))

    def _try_lock(self, conn: Any, name: str) -> str | None:
        """Take the session advisory lock ``name`` on ``conn`` (keyed like lock()) if it is free:
        None, or who holds it."""
        import psycopg

        try:
            got = conn.execute("SELECT pg_try_advisory_lock(hashtext(current_schema()), hashtext(%s))",
                               (name,)).fetchone()
            row = None if got and got[0] else conn.execute(
                "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.objsubid = 2 AND l.classid = hashtext(current_schema())::oid "
                "AND l.objid = hashtext(%s)::oid", (name,)).fetchone()
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL error {getattr(exc, 'sqlstate', None) or '-'} "
                               f"taking the lock {name!r}") from None
        if got and got[0]:
            return None
        return (f"{row[0] or 'a connection'} from {row[1] or 'a local socket'}, since "
                f"{row[2].astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC") if row else "another connection"

    @contextmanager
    def _locked_connection(self, name: str, holder: str, wait: bool, wait_s: float = 0) -> Iterator[Any]:
        # A session advisory lock on a connection of its own (not the pool's: it outlives
        # transactions); the holder's description is its application_name.
        import psycopg

        try:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=max(1, int(self._timeout_s)),
                                   application_name=f"biogate {holder}"[:63])
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {type(exc).__name__}") from None
        try:
            if wait:
                # Not pg_advisory_lock(): a backend waiting in it holds a snapshot, which a CREATE
                # INDEX CONCURRENTLY of the holder waits for, a deadlock. An idle listener holds none;
                # the holder notifies on release, and a holder that died notifies no one (the timeout).
                with self._mapped_errors():
                    conn.execute(f"LISTEN {_LOCK_CHANNEL}")
                    who = self._try_lock(conn, name)
                    if who is not None:
                        log.warning("waiting for the lock %r, held by %s (%s)", name, who,
                                    f"for at most {wait_s:g} s" if wait_s else "without limit")
                    deadline = time.monotonic() + wait_s
                    while who is not None:
                        left = deadline - time.monotonic() if wait_s else 1.0
                        if left <= 0:
                            raise LockHeldError(name, who)
                        for _ in conn.notifies(timeout=min(1.0, left), stop_after=1):
                            pass
                        who = self._try_lock(conn, name)
            else:
                who = self._try_lock(conn, name)
                if who is not None:
                    raise LockHeldError(name, who)
            try:
                yield conn
            finally:
                # Closing the connection alone releases the lock only when the server's backend
                # has exited, after close() returns: the next key operation would find it held.
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(hashtext(current_schema()), hashtext(%s))", (name,))
                    conn.execute("SELECT pg_notify(%s, '')", (_LOCK_CHANNEL,))
        finally:
            conn.close()  # releases it in any case, if the unlock above could not run

    @contextmanager
    def _exclusive(self, name: str, holder: str) -> Iterator[None]:
        with self._locked_connection(name, holder, wait=False):
            yield

    @contextmanager
    def held(self, name: str, what: str, wait_s: float = 0) -> Iterator[HeldConnection]:
        """A connection of its own holding the lock ``name`` (waiting for it without holding a
        snapshot) for the whole block, across its transactions and statements run outside any.
        Waits at most ``wait_s`` (0: without limit), then raises :class:`LockHeldError`."""
        with self._locked_connection(name, f"{what}, pid {os.getpid()} on {socket.gethostname()}",
                                     wait=True, wait_s=wait_s) as conn:
            yield HeldConnection(self, conn)

    def has_table(self, session: Session, name: str) -> bool:
        return session.one("SELECT to_regclass(?) IS NOT NULL", (name,))[0]

    def close(self) -> None:
        self._pool.close()

