"""PostgreSQL migrations that run outside a transaction (``-- biogate: no-transaction``): a
concurrent index build lets writers through, a failed one is run again safely, and migrators
waiting for the lock never deadlock with it. Each test works in a fresh database
(``pg_database_dsn``: a concurrent build waits for every older transaction in its database, other
tests' too) with a schema part of its own, in a package written to tmp_path."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from services.common.config import PROJECT_ROOT
from services.common.storage import MigrationError, StorageError, open_storage
from services.common.storage.db import PostgresDatabase
from services.common.config import StorageConfig
from services.common.storage.migrate import MigrationLimits, SchemaPart, load_migrations, migrate, statements
from services.mfa.storage import PART as MFA

TABLE = "CREATE TABLE ledger (id BIGSERIAL PRIMARY KEY, v INTEGER NOT NULL);\n"
ONLINE = "-- biogate: no-transaction\n"
MIGRATOR = f"biogate schema migrations, pid {os.getpid()} on {socket.gethostname()}"[:63]


class Part:
    """A schema part whose migration files the test writes as it goes."""

    def __init__(self, root: Path) -> None:
        package = f"online_part_{uuid.uuid4().hex[:8]}"
        self.folder = root / package / "migrations"
        (root / package / "__init__.py").parent.mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
        self.schema = SchemaPart("online", package)

    def add(self, name: str, sql: str, dialect: str = "postgres") -> None:
        (self.folder / dialect).mkdir(parents=True, exist_ok=True)
        (self.folder / dialect / name).write_text(sql)


@pytest.fixture
def part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Part:
    monkeypatch.syspath_prepend(str(tmp_path))
    return Part(tmp_path)


@pytest.fixture
def db(pg_database_dsn: str) -> Iterator[PostgresDatabase]:
    d = PostgresDatabase(pg_database_dsn, 4, 10.0)
    yield d
    d.close()


@pytest.fixture
def monitor(pg_database_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_database_dsn, autocommit=True) as conn:
        yield conn


def in_thread(work: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = work()
        except BaseException as exc:  # noqa: BLE001  (the test asserts on it)
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def wait_for(monitor: psycopg.Connection, query: str, params: tuple = (), what: str = "") -> list[tuple]:
    """Ask the server until ``query`` returns rows (what another backend is doing has no event)."""
    pause = threading.Event()
    for _ in range(3000):
        rows = monitor.execute(query, params).fetchall()
        if rows:
            return rows
        pause.wait(0.01)
    raise AssertionError(f"never happened: {what or query}")


def blocked_by(monitor: psycopg.Connection, blocker: int, application_name: str | None = None,
               pid: int | None = None) -> int:
    """The pid of the backend (by application name, or pid) that waits for a lock ``blocker`` holds."""
    return wait_for(
        monitor,
        "SELECT pid FROM pg_stat_activity WHERE (application_name = %s OR pid = %s)"
        " AND %s = ANY(pg_blocking_pids(pid))",
        (application_name, pid, blocker), f"a backend waiting for {blocker}")[0][0]


def versions(db: PostgresDatabase) -> list[int]:
    with db.read() as s:
        return [r[0] for r in s.all("SELECT version FROM schema_versions WHERE part = 'online' ORDER BY version")]


def index_valid(db: PostgresDatabase, name: str) -> bool | None:
    with db.read() as s:
        row = s.one("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(?)", (name,))
        return None if row is None else row[0]


@pytest.fixture
def open_writer(pg_database_dsn: str) -> Iterator[Callable[[], psycopg.Connection]]:
    """A transaction that has written to the table and stays open until the test commits it (or
    fails: closed before the schema is dropped)."""
    opened: list[psycopg.Connection] = []

    def start() -> psycopg.Connection:
        conn = psycopg.connect(pg_database_dsn)
        opened.append(conn)
        conn.execute("INSERT INTO ledger (v) VALUES (1)")
        return conn

    yield start
    for conn in opened:
        conn.close()


def test_writes_proceed_while_a_concurrent_index_is_built(db, part, pg_database_dsn, monitor, open_writer) -> None:
    part.add("0001_ledger.sql", TABLE)
    assert migrate(db, part.schema) == [1]
    part.add("0002_ledger_v.sql", ONLINE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_v ON ledger (v);\n")
    first = open_writer()
    t, out = in_thread(lambda: migrate(db, part.schema))
    migrator = blocked_by(monitor, first.info.backend_pid, MIGRATOR)  # the build waits for the open writer
    with psycopg.connect(pg_database_dsn, autocommit=True) as second:
        second.execute("SET lock_timeout = '60s'")  # fails the test, rather than hangs it, if held
        second.execute("INSERT INTO ledger (v) VALUES (2)")
    # The second writer went past the build, which still waits for the first.
    assert first.info.backend_pid in monitor.execute("SELECT pg_blocking_pids(%s)", (migrator,)).fetchone()[0]
    assert t.is_alive() and versions(db) == [1]
    first.commit()
    first.close()
    t.join(120)
    assert out == {"result": [2]}
    assert index_valid(db, "ledger_v") is True and versions(db) == [1, 2]
    assert migrate(db, part.schema) == []


def test_a_plain_create_index_holds_the_writers_behind_it(db, part, pg_database_dsn, monitor, open_writer) -> None:
    """Why the directive exists: the transactional files' CREATE INDEX queues a SHARE lock that
    every later writer of the table waits behind."""
    part.add("0001_ledger.sql", TABLE)
    migrate(db, part.schema)
    part.add("0002_ledger_v.sql", "CREATE INDEX ledger_v ON ledger (v);\n")
    first = open_writer()
    t, out = in_thread(lambda: migrate(db, part.schema))
    migrator = blocked_by(monitor, first.info.backend_pid, MIGRATOR)
    second = psycopg.connect(pg_database_dsn, autocommit=True)
    w, written = in_thread(lambda: second.execute("INSERT INTO ledger (v) VALUES (2)"))
    blocked_by(monitor, migrator, pid=second.info.backend_pid)  # the second writer waits for the build
    first.commit()
    first.close()
    t.join(120)
    w.join(120)
    second.close()
    assert out == {"result": [2]} and "error" not in written


def test_a_concurrent_build_is_refused_inside_the_callers_transaction(db, part) -> None:
    part.add("0001_ledger.sql", TABLE)
    part.add("0002_ledger_v.sql", ONLINE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_v ON ledger (v);\n")
    with db.transaction(), pytest.raises(MigrationError, match="0002_ledger_v runs outside any transaction"):
        migrate(db, part.schema)
    assert versions(db) == [1] and index_valid(db, "ledger_v") is None


def test_a_failed_concurrent_build_is_run_again_safely(db, part) -> None:
    part.add("0001_ledger.sql", TABLE + "INSERT INTO ledger (v) VALUES (7), (7);\n")
    migrate(db, part.schema)
    part.add("0002_ledger_unique.sql", ONLINE + "-- the first index is built, the second fails on the duplicates\n"
             "CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_id_v ON ledger (id, v);\n"
             "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ledger_v ON ledger (v);\n")
    with pytest.raises(StorageError, match="23505"):
        migrate(db, part.schema)
    assert versions(db) == [1]
    assert index_valid(db, "ledger_id_v") is True
    assert index_valid(db, "ledger_v") is False  # the INVALID leftover of the failed build
    with db.read() as s:
        built = s.one("SELECT to_regclass('ledger_id_v')::oid")[0]
    with db.transaction() as s:
        s.execute("DELETE FROM ledger WHERE id = (SELECT max(id) FROM ledger)")
    assert migrate(db, part.schema) == [2]
    assert index_valid(db, "ledger_v") is True and versions(db) == [1, 2]
    with db.read() as s:
        assert s.one("SELECT to_regclass('ledger_id_v')::oid")[0] == built  # kept, not built again
        assert s.one("SELECT count(*) FROM schema_versions WHERE part = 'online' AND version = 2")[0] == 1


def test_a_migrator_waiting_for_the_lock_does_not_deadlock_a_concurrent_build(db, part, pg_database_dsn, monitor, open_writer) -> None:
    """A backend waiting in pg_advisory_lock() holds a snapshot that CREATE INDEX CONCURRENTLY
    waits for: a second migrator waiting that way would deadlock with the first."""
    part.add("0001_ledger.sql", TABLE)
    migrate(db, part.schema)
    part.add("0002_ledger_v.sql", ONLINE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_v ON ledger (v);\n")
    first = open_writer()
    t1, out1 = in_thread(lambda: migrate(db, part.schema))
    blocked_by(monitor, first.info.backend_pid, MIGRATOR)
    other = PostgresDatabase(pg_database_dsn, 2, 10.0)
    t2, out2 = in_thread(lambda: migrate(other, part.schema))
    # Idle after trying the lock, or after asking who holds it: the second one waits, holding no snapshot.
    wait_for(monitor, "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND state = 'idle'"
             " AND (query LIKE '%%pg_try_advisory_lock%%' OR query LIKE '%%pg_locks%%')",
             (MIGRATOR,), "the second migrator waiting")
    first.commit()
    first.close()
    t1.join(120)
    t2.join(120)
    other.close()
    assert out1 == {"result": [2]} and out2 == {"result": []}
    assert index_valid(db, "ledger_v") is True


def test_a_migrator_killed_mid_build_leaves_the_build_to_finish_and_the_next_one_to_record_it(
        db, part, pg_database_dsn, monitor, open_writer) -> None:
    """What the migrate Job's deadline does to a long build (README, "Kubernetes"): the server goes
    on building after the process is killed (it reads from the client only once the build is done),
    holding the migration lock; the next migrator waits for it and keeps the index built."""
    part.add("0001_ledger.sql", TABLE)
    migrate(db, part.schema)
    part.add("0002_ledger_v.sql", ONLINE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_v ON ledger (v);\n")
    first = open_writer()
    code = ("import sys; from services.common.storage.db import PostgresDatabase;"
            " from services.common.storage.migrate import SchemaPart, migrate;"
            f" sys.path.insert(0, {str(part.folder.parent.parent)!r});"
            f" migrate(PostgresDatabase(sys.argv[1], 2, 10.0), SchemaPart('online', {part.schema.package!r}))")
    killed = subprocess.Popen([sys.executable, "-c", code, pg_database_dsn], cwd=PROJECT_ROOT)
    try:
        (orphan,) = wait_for(monitor, "SELECT pid FROM pg_stat_activity WHERE application_name LIKE"
                             " 'biogate schema migrations, pid %%' AND %s = ANY(pg_blocking_pids(pid))",
                             (first.info.backend_pid,), "the build waiting for the open writer")[0]
    finally:
        killed.kill()
        killed.wait()
    built = monitor.execute("SELECT to_regclass('ledger_v')::oid").fetchone()[0]
    t, out = in_thread(lambda: migrate(db, part.schema))
    wait_for(monitor, "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND state = 'idle'"
             " AND (query LIKE '%%pg_try_advisory_lock%%' OR query LIKE '%%pg_locks%%')",
             (MIGRATOR,), "the next migrator waiting for the lock")
    assert monitor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (orphan,)).fetchone() == ("active",)
    first.commit()
    first.close()
    t.join(120)
    assert out == {"result": [2]} and versions(db) == [1, 2]
    assert index_valid(db, "ledger_v") is True
    with db.read() as s:
        assert s.one("SELECT to_regclass('ledger_v')::oid")[0] == built  # the orphan's build, kept


def test_the_loader_refuses_what_cannot_run_outside_a_transaction(part) -> None:
    part.add("0001_ledger.sql", ONLINE + TABLE, dialect="sqlite")
    with pytest.raises(MigrationError, match="only PostgreSQL files may run outside a transaction"):
        load_migrations("sqlite", part.schema)
    part.add("0001_ledger.sql", ONLINE + "CREATE INDEX CONCURRENTLY ledger_v ON ledger (v);\n")
    with pytest.raises(MigrationError, match="IF NOT EXISTS ledger_v"):
        load_migrations("postgres", part.schema)
    part.add("0001_ledger.sql", ONLINE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_v ON ledger (v)\n")
    with pytest.raises(MigrationError, match="unterminated SQL statement"):
        load_migrations("postgres", part.schema)
    part.add("0001_ledger.sql", ONLINE + "DROP INDEX CONCURRENTLY ledger_v;\n")
    with pytest.raises(MigrationError, match="IF EXISTS ledger_v"):
        load_migrations("postgres", part.schema)
    # A statement the directive would commit on its own, and a second run would not skip.
    for stmt in ("ALTER TABLE ledger ADD COLUMN w INTEGER", "CREATE INDEX ledger_v ON ledger (v)",
                 "INSERT INTO ledger (v) VALUES (1)", "DROP INDEX CONCURRENTLY IF EXISTS ledger_v, ledger_w"):
        part.add("0001_ledger.sql", f"{ONLINE}{stmt};\n")
        with pytest.raises(MigrationError, match="must be re-runnable.*in a file without the directive"):
            load_migrations("postgres", part.schema)


def test_a_no_transaction_file_replaces_an_index_and_runs_again_safely(db, part) -> None:
    part.add("0001_ledger.sql", TABLE + "CREATE INDEX ledger_old ON ledger (v);\n")
    migrate(db, part.schema)
    part.add("0002_ledger_v_id.sql", ONLINE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_v_id ON ledger (v, id);\n"
             "DROP INDEX CONCURRENTLY IF EXISTS ledger_old;\n")
    assert migrate(db, part.schema) == [2]
    assert index_valid(db, "ledger_old") is None and index_valid(db, "ledger_v_id") is True
    with db.transaction() as s:  # as if the run had failed after its last statement
        s.execute("DELETE FROM schema_versions WHERE part = 'online' AND version = 2")
    assert migrate(db, part.schema) == [2]
    assert index_valid(db, "ledger_old") is None and index_valid(db, "ledger_v_id") is True


def test_statements_split_outside_quotes_and_comments() -> None:
    sql = "-- a; comment\nINSERT INTO t VALUES ('a;b', \"c;\"); -- trailing; comment\n\nSELECT 1;\n"
    assert statements(sql) == ["INSERT INTO t VALUES ('a;b', \"c;\")", "SELECT 1"]
    with pytest.raises(MigrationError, match="dollar-quoted"):
        statements("DO $$ BEGIN END $$;")


def readme_prebuilt_indexes() -> list[str]:
    """The statements README gives an operator to build the shipped files' indexes beforehand."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Upgrading a large PostgreSQL database.**"):]
    block = section[section.index("```sql"):section.index("```", section.index("```sql") + 6)]
    return [ln for ln in block.splitlines() if ln.startswith("CREATE INDEX CONCURRENTLY")]


def test_the_shipped_migrations_keep_the_indexes_readme_builds_beforehand(pg_database_dsn) -> None:
    st = open_storage(pg_database_dsn)
    st.attach(MFA)
    # Back to a database at shared v1 and mfa v6 (with v4 and v6 applied, which re-run otherwise).
    with st.db.transaction() as s:
        s.execute("DELETE FROM schema_versions WHERE (part = 'shared' AND version IN (2, 3))"
                  " OR (part = 'mfa' AND version IN (7, 8))")
        s.script("DROP INDEX consents_recorded, consents_withdrawn, audit_records_key_introduced, mfa_reviews_resolved,"
                 " mfa_lockouts_updated, devices_revoked, mfa_webhook_outbox_settled, devices_bound_fingerprint,"
                 " mfa_webhook_outbox_due;"
                 " CREATE INDEX mfa_webhook_outbox_created ON mfa_webhook_outbox (created_at, id);"
                 " CREATE INDEX mfa_webhook_outbox_due ON mfa_webhook_outbox (next_attempt_at);")
    prebuilt = readme_prebuilt_indexes()
    assert len(prebuilt) == 8
    with psycopg.connect(pg_database_dsn, autocommit=True) as operator:
        for stmt in prebuilt:
            operator.execute(stmt)
        built: dict[str, int] = dict(operator.execute("SELECT relname, oid FROM pg_class WHERE relkind = 'i'").fetchall())
    assert migrate(st.db) == [2, 3]
    assert migrate(st.db, MFA.schema) == [7, 8]
    with st.db.read() as s:
        after = dict(s.all("SELECT relname, oid FROM pg_class WHERE relkind = 'i'"))
    names = [statements(stmt)[0].split()[6] for stmt in prebuilt]
    assert {n: after[n] for n in names} == {n: built[n] for n in names}  # kept, not built again
    st.close()


def test_an_invalid_index_built_beforehand_is_refused_with_what_to_do(db, part, pg_database_dsn) -> None:
    part.add("0001_ledger.sql", TABLE + "INSERT INTO ledger (v) VALUES (7), (7);\n")
    migrate(db, part.schema)
    with psycopg.connect(pg_database_dsn, autocommit=True) as operator, pytest.raises(psycopg.errors.UniqueViolation):
        operator.execute("CREATE UNIQUE INDEX CONCURRENTLY ledger_v ON ledger (v)")
    part.add("0002_ledger_v.sql", "CREATE UNIQUE INDEX ledger_v ON ledger (v);\n")
    with pytest.raises(MigrationError, match="ledger_v built beforehand is INVALID.*DROP INDEX CONCURRENTLY ledger_v"):
        migrate(db, part.schema)
    assert versions(db) == [1]


def test_a_start_gives_up_waiting_for_the_migration_lock_and_names_its_holder(pg_database_dsn, caplog) -> None:
    """A new replica started while `biogate migrate` builds an index exits saying why, instead of
    hanging until its startup probe kills it."""
    config = StorageConfig(migration_lock_wait_s=0.05)
    caplog.set_level(logging.WARNING, logger="services.common.storage.db")
    with psycopg.connect(pg_database_dsn, autocommit=True, application_name="biogate migrate Job") as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext(current_schema()), hashtext('schema_versions'))")
        with pytest.raises(MigrationError, match=r"waited 0.05 s for the schema migration lock of shared, held by "
                           r"biogate migrate Job from .* since .* UTC: another process is migrating this database.*"
                           r"raise storage.migration_lock_wait_s"):
            open_storage(pg_database_dsn, config)
        assert holder.execute("SELECT to_regclass('schema_versions')").fetchone() == (None,)  # nothing ran
        waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for the lock")]
        assert len(waits) == 1 and "held by biogate migrate Job" in waits[0] and "at most 0.05 s" in waits[0]
        holder.execute("SELECT pg_advisory_unlock(hashtext(current_schema()), hashtext('schema_versions'))")
    with open_storage(pg_database_dsn, config) as st, st.db.read() as s:
        assert s.one("SELECT count(*) FROM schema_versions WHERE part = 'shared'")[0] > 0


def test_a_migration_queued_behind_a_long_transaction_fails_fast_and_runs_again(db, part, open_writer) -> None:
    """An ALTER TABLE waiting for its ACCESS EXCLUSIVE lock holds every later query of the table
    behind it: with lock_timeout it gives up, applying nothing, and runs again once the table is free."""
    part.add("0001_ledger.sql", TABLE)
    migrate(db, part.schema)
    part.add("0002_ledger_w.sql", "ALTER TABLE ledger ADD COLUMN w INTEGER;\n")
    part.add("0003_ledger_x.sql", "ALTER TABLE ledger ADD COLUMN x INTEGER;\n")
    writer = open_writer()  # its ROW EXCLUSIVE lock, held until it commits
    with pytest.raises(MigrationError, match=r"migration 0002_ledger_w waited more than 0.2 s \(storage.migration_lock"
                       r"_timeout_s\) for a lock on a table it changes.*nothing of 0002 was applied: run `biogate "
                       r"migrate` again in a quieter moment, or raise storage.migration_lock_timeout_s"):
        migrate(db, part.schema, MigrationLimits(lock_timeout_s=0.2))
    assert versions(db) == [1]
    writer.commit()
    assert migrate(db, part.schema, MigrationLimits(lock_timeout_s=0.2)) == [2, 3]
    with db.read() as s:
        assert s.one("SELECT count(*) FROM information_schema.columns WHERE table_name = 'ledger'"
                     " AND column_name IN ('w', 'x') AND table_schema = current_schema()")[0] == 2


def test_a_concurrent_build_waits_for_older_transactions_past_the_lock_timeout(db, part, monitor, open_writer) -> None:
    """lock_timeout would cancel a concurrent build's wait for older transactions, which is its design
    (its own lock lets the table's reads and writes through): the no-transaction files run without it."""
    part.add("0001_ledger.sql", TABLE)
    migrate(db, part.schema)
    part.add("0002_ledger_v.sql", ONLINE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_v ON ledger (v);\n")
    first = open_writer()
    t, out = in_thread(lambda: migrate(db, part.schema, MigrationLimits(lock_timeout_s=0.05)))
    migrator = blocked_by(monitor, first.info.backend_pid, MIGRATOR)
    wait_for(monitor, "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
             " AND clock_timestamp() - query_start > interval '0.5 s'", (migrator,), "the build waiting past 0.05 s")
    assert t.is_alive() and versions(db) == [1]
    first.commit()
    first.close()
    t.join(120)
    assert out == {"result": [2]} and index_valid(db, "ledger_v") is True


def test_biogate_migrate_waits_as_long_as_its_flag_says(pg_database_dsn, tmp_path, capsys) -> None:
    from services.cli import main as biogate

    config = tmp_path / "biogate.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nstorage:\n  dsn: {pg_database_dsn}\n")
    assert biogate(["--config", str(config), "migrate", "--lock-wait-s", "-1"]) == 1
    assert "--lock-wait-s must be 0 (without limit) or more, not -1" in capsys.readouterr().err
    with psycopg.connect(pg_database_dsn, autocommit=True, application_name="another migrate") as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext(current_schema()), hashtext('schema_versions'))")
        assert biogate(["--config", str(config), "migrate", "--lock-wait-s", "0.05"]) == 1
    err = capsys.readouterr().err
    assert err.count("waiting for the lock") == 1  # the log, before the one line of the error
    assert err.splitlines()[-1].startswith("biogate migrate: waited 0.05 s for the schema migration lock of shared, "
                                           "held by another migrate from ")
    assert "raise storage.migration_lock_wait_s" in err.splitlines()[-1]
