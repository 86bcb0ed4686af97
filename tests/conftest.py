"""Fixtures shared by every suite: settings in a temporary data dir, PostgreSQL schemas, the
fixtures folder, and real services on loopback."""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, overload
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.common.config import PROJECT_ROOT
from services.settings import Settings, load_config
# The SoftHSM2 token fixture, registered here once for the whole session: SoftHSM reads its
# configuration once per process, so a second session-scoped copy (each module that imported the
# fixture got its own) made a second token directory the in-process library never saw, while
# child processes, given the new $SOFTHSM2_CONF, saw only that one.
from tests.softhsm import softhsm_fixture  # noqa: F401  (fixture)

if TYPE_CHECKING:
    from services.common.server.bootstrap import RunningServer

SHARED = PROJECT_ROOT.parent / "shared"
PG_BASE_DSN = os.environ.get("BIOGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_runtest_setup(item) -> None:
    # Hypothesis scans sys.modules for constants with getattr(module, "__file__"),
    # which makes SpeechBrain's not-yet-loaded lazy redirects import their targets,
    # some of which (k2_fsa) are optional packages that are not installed.
    for name, module in list(sys.modules.items()):
        lazy = any(c.__name__ == "LazyModule" for c in type(module).__mro__)
        if lazy and getattr(module, "lazy_module", 0) is None:
            del sys.modules[name]


# Fixtures that load models or start model-backed services: a test using one (directly or through
# another fixture) is in the `models` tier, which `make check` leaves out.
MODEL_FIXTURES = frozenset({
    "face_models", "voice_models", "model_store", "registry_store", "shared_models", "services",
    "face_service", "voice_service",
})


# Modules that start whole services with their models in the test itself (no fixture says so).
MODEL_PATHS = ("face/", "voice/", "attacks/", "mfa/test_e2e.py", "deploy/test_replicas.py",
               "deploy/test_example_config.py", "services/test_complete_erasure.py",
               "services/test_same_failures.py", "services/test_serve_cli.py",
               "services/test_serve_workers.py")


def pytest_collection_modifyitems(config, items) -> None:
    here = Path(__file__).parent
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        where = Path(str(item.fspath)).relative_to(here).as_posix()
        if names & MODEL_FIXTURES or where.startswith(MODEL_PATHS):
            item.add_marker(pytest.mark.models)
        if names & {"pg_dsn", "pg_database_dsn"} or "[postgres" in item.nodeid:
            item.add_marker(pytest.mark.postgres)


R = TypeVar("R")


def present(value: R | None) -> R:
    """``value``, asserted there: a lookup the test expects to find something."""
    assert value is not None
    return value


def race(n: int, work: Callable[[int], R]) -> list[R | Exception | None]:
    """Run work(i) on n threads released together; each result or raised exception, in order."""
    start = threading.Barrier(n)
    results: list[R | Exception | None] = [None] * n

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # collected for the assertions
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def side_by_side(first: Callable[[], R], second: Callable[[], R]) -> tuple[R, R]:
    """first() and second() at once (second on a thread of its own), each running its calls in its
    own order: a local evaluation and the same one through a service, whose models run one thread
    per call, each alone leaving a core of the machine idle."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(second)
        return first(), later.result()


class Prefetched:
    """A verification scorer's answers to ``trials``, made ``workers`` calls at a time (every
    distinct enrolment, then every probe against its enrolment), for run_verification to read in its
    own order: a service whose models run one thread per call, called one call at a time, leaves a
    core idle. Only for a scorer whose answers do not depend on the order of its calls."""

    def __init__(self, scorer, trials, workers: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from services.common.evaluation.scorers import Failure

        self.score_name = scorer.score_name
        enrolments = list(dict.fromkeys(tuple(t.enroll) for t in trials))
        with ThreadPoolExecutor(workers) as pool:
            self._handles = dict(zip(enrolments, pool.map(lambda e: scorer.enroll(list(e)), enrolments), strict=True))
            pairs = list(dict.fromkeys((tuple(t.enroll), t.probe) for t in trials
                                       if not isinstance(self._handles[tuple(t.enroll)], Failure)))
            self._scores = dict(zip(pairs, pool.map(lambda ep: scorer.score(self._handles[ep[0]], ep[1]), pairs), strict=True))

    def enroll(self, paths):
        """The enrolment's failure, or its key as the handle."""
        from services.common.evaluation.scorers import Failure

        handle = self._handles[tuple(paths)]
        return handle if isinstance(handle, Failure) else tuple(paths)

    def score(self, handle, probe):
        return self._scores[(handle, probe)]


# grpc_health's and grpc_reflection's type stubs declare none of their stubs' methods: the same
# calls, typed, on the services' descriptors.
_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


@overload
def health_check(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]: ...
@overload
def health_check(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]: ...
def health_check(channel: grpc.Channel | grpc.aio.Channel) -> (
        grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]
        | grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]):
    """grpc.health.v1.Health/Check on ``channel``."""
    return channel.unary_unary(f"/{_HEALTH}/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)


def reflection_info(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable[
        reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse]:
    """grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo on ``channel``."""
    return channel.stream_stream(f"/{_REFLECTION}/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


def require(condition: bool, what: str) -> None:
    """Missing test data or services fail loudly in CI and skip elsewhere."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI", pytrace=False)
    pytest.skip(f"{what} is not available here")


def require_redis(url: str) -> str:
    """``url`` once its Redis answers (the local Redis: every machine of the project has one)."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        ok = True
    except redis.exceptions.ConnectionError:
        ok = False
    require(ok, f"Redis at {url}")
    return url


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require((SHARED / "fixtures").is_dir(), f"the shared folder {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"


def make_settings(data_dir: Path, **overrides) -> Settings:
    models = {"cache_dir": str(PROJECT_ROOT / "var" / "models")}  # the fetched models, shared by tests
    models.update(overrides.pop("models", {}))
    # the MFA's JWKS endpoint on a port the OS chooses, as the harness does for gRPC: tests run side by side
    mfa = overrides.pop("mfa", {})
    overrides["mfa"] = {**mfa, "http": {"port": 0, **mfa.get("http", {})}}
    return load_config(None, data_dir=str(data_dir), models=models, **overrides)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


def _pg_available() -> bool:
    import psycopg

    try:
        with psycopg.connect(PG_BASE_DSN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def _fresh_schema():
    import psycopg

    require(_pg_available(), f"PostgreSQL at {PG_BASE_DSN}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_BASE_DSN else "?"
    try:
        yield f"{PG_BASE_DSN}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_BASE_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def pg_dsn():
    """A DSN whose search_path is a fresh schema, dropped afterwards."""
    with _fresh_schema() as dsn:
        yield dsn


@pytest.fixture
def pg_database_dsn():
    """A DSN of a fresh database, dropped afterwards: for what PostgreSQL scopes to a whole database
    (CREATE INDEX CONCURRENTLY waits for every older transaction in it, whatever its schema)."""
    import psycopg

    require(_pg_available(), f"PostgreSQL at {PG_BASE_DSN}")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlsplit(PG_BASE_DSN)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(PG_BASE_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def storage_dsn(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_dsn")


@pytest.fixture
def other_storage_dsn(storage_dsn: str, tmp_path: Path):
    """A second, empty database of the same backend as ``storage_dsn``."""
    if storage_dsn.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'other.db'}"
        return
    with _fresh_schema() as dsn:
        yield dsn


LEGACY_SCHEMA = Path(__file__).parent / "storage" / "legacy_schema"


def create_legacy_database(dsn: str, versions: int = 3) -> None:
    """A database as the code before the schema split left it: the first ``versions`` files of the
    one migration history (kept in tests/storage/legacy_schema) applied and recorded the old way."""
    import hashlib
    from datetime import datetime, timezone

    from services.common.storage.db import Database, PostgresDatabase, SqliteDatabase

    db: Database = (SqliteDatabase(Path(dsn[len("sqlite:///"):]), 2, 10.0, "FULL") if dsn.startswith("sqlite")
                    else PostgresDatabase(dsn, 2, 10.0))
    try:
        with db.transaction() as s:
            s.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                      " checksum TEXT NOT NULL, applied_at TEXT NOT NULL)")
            for path in sorted((LEGACY_SCHEMA / db.dialect.name).glob("*.sql"))[:versions]:
                sql = path.read_text(encoding="utf-8")
                s.script(sql)
                s.execute("INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                          (int(path.name[:4]), path.stem[5:], hashlib.sha256(sql.encode()).hexdigest(),
                           datetime.now(timezone.utc).isoformat()))
    finally:
        db.close()


def schema_of(storage) -> list[tuple]:
    """Tables, columns, indexes, constraints and triggers, comparable across databases."""
    with storage.db.read() as s:
        if storage.dialect == "sqlite":
            return [tuple(r) for r in s.all(
                "SELECT type, name, tbl_name, sql FROM sqlite_master"
                " WHERE name NOT LIKE 'schema_%' AND name NOT LIKE 'sqlite_%' ORDER BY type, name")]
        schema = s.one("SELECT current_schema()")[0]
        rows = [("column", *r) for r in s.all(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name NOT LIKE 'schema_%'"
            " ORDER BY table_name, column_name")]
        rows += [("index", r[0], r[1].replace(f"{schema}.", "")) for r in s.all(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename NOT LIKE 'schema_%' ORDER BY indexname")]
        rows += [("constraint", *r) for r in s.all(
            "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
            " JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = current_schema()"
            " AND c.conrelid::regclass::text NOT LIKE 'schema_%' ORDER BY 1, 2")]
        rows += [("trigger", *r) for r in s.all(
            "SELECT event_object_table, trigger_name, event_manipulation, action_statement"
            " FROM information_schema.triggers WHERE trigger_schema = current_schema() ORDER BY 1, 2, 3")]
        return rows


def db_snapshot(sqlite_path: Path) -> dict[str, tuple[int, str]]:
    """Each table of a SQLite database: its row count and a digest of its rows (an update changes it)."""
    import hashlib
    import sqlite3

    db = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    try:
        out = {}
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            rows = sorted(repr(r) for r in db.execute(f'SELECT * FROM "{table}"'))
            out[table] = (len(rows), hashlib.sha256("\n".join(rows).encode()).hexdigest())
        return out
    finally:
        db.close()


class ServiceHarness:
    """Real services on loopback ports chosen by the OS."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: dict[str, RunningServer] = {}

    def start(self, name: str, timeout: float = 300.0):
        from services.common.server.bootstrap import RunningServer
        from services.serve import definition, prepare

        prepare(self.settings)
        server = RunningServer(self.settings, definition(self.settings, name), port=0).start()
        self.running[name] = server
        if not server.ready.wait(timeout):
            raise TimeoutError(f"{name} did not become SERVING within {timeout} s")
        return server

    def tokens(self) -> dict[str, str]:
        return json.loads(self.settings.dev_credentials_file.read_text())

    def channel(self, name: str, token: str | None = "dev-all") -> grpc.Channel:
        from services.common.client import connect

        return connect(self.running[name].address, self.tokens()[token] if token else None)

    def stop(self) -> None:
        for server in self.running.values():
            server.stop(grace=0)


@pytest.fixture
def captured_logs():
    """What the process logs during the test, as the services' JSON lines (DEBUG and up)."""
    import io
    import logging

    from services.common.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
def services(settings: Settings):
    harness = ServiceHarness(settings)
    yield harness
    harness.stop()
