"""Fixtures shared by every suite: settings in a temporary data dir, PostgreSQL schemas, the
fixtures folder, and real services on loopback."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import grpc
import pytest

from services.common.config import PROJECT_ROOT, Settings, load_config

SHARED = PROJECT_ROOT.parent / "shared"
PG_BASE_DSN = os.environ.get("BIOGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def require(condition: bool, what: str) -> None:
    """Missing test data or services fail loudly in CI and skip elsewhere."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI", pytrace=False)
    pytest.skip(f"{what} is not available here")


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


@pytest.fixture
def pg_dsn():
    """A DSN whose search_path is a fresh schema, dropped afterwards."""
    import psycopg

    require(_pg_available(), f"PostgreSQL at {PG_BASE_DSN}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_BASE_DSN else "?"
    yield f"{PG_BASE_DSN}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_BASE_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def storage_dsn(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_dsn")


class ServiceHarness:
    """Real services on loopback ports chosen by the OS."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running = {}

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
def services(settings: Settings):
    harness = ServiceHarness(settings)
    yield harness
    harness.stop()
