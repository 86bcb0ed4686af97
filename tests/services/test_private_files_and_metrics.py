"""What the services leave on disk is readable by their own user only, and the metrics endpoint binds
where it is told (loopback by default) and can ask for the services' credentials (issue 12: the
SQLite database and WAL were 0644; metrics had no authentication or bind address setting)."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request

import pytest

from services.settings import Settings
from services.common.metrics import serve_metrics
from services.common.runtime import Runtime
from services.common.storage import ConsentRecord
from services.serve import metrics_credentials
from tests.conftest import make_settings


@pytest.fixture
def open_umask():
    old = os.umask(0o022)  # what most shells give: new files 0644, new folders 0755
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_data_dir_database_wal_shm_and_keys_are_private(tmp_path, open_umask):
    settings = make_settings(tmp_path / "data")
    rt = Runtime.open(settings)
    try:
        rt.storage.subjects.record_consent(ConsentRecord("bank-a", "cust-1", "biometric_verification", ("face",), "v1"))
        db = settings.sqlite_path
        files = {p.name: mode(p) for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"))}
        assert files == {"biogate.db": 0o600, "biogate.db-wal": 0o600, "biogate.db-shm": 0o600}
        assert mode(settings.data_dir) == 0o700
        assert mode(settings.keyring_file.parent) == 0o700
        for secret in (settings.keyring_file, settings.audit_signing_key_file, settings.dev_credentials_file):
            assert mode(secret) == 0o600, secret.name
    finally:
        rt.close()


def test_an_existing_world_readable_database_is_tightened(tmp_path, open_umask):
    settings = make_settings(tmp_path / "data")
    Runtime.open(settings).close()
    os.chmod(settings.sqlite_path, 0o644)
    os.chmod(settings.data_dir, 0o755)
    Runtime.open(settings).close()
    assert (mode(settings.sqlite_path), mode(settings.data_dir)) == (0o600, 0o700)


def get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert b"biogate_rpc" in reply.read()
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def test_metrics_bind_to_loopback_by_default_and_can_require_the_services_credentials(tmp_path):
    defaults = Settings(data_dir=tmp_path)
    assert {defaults.endpoint(s).metrics_host for s in ("face", "voice", "mfa")} == {"127.0.0.1"}
    assert defaults.server.metrics_auth is False

    settings = make_settings(tmp_path / "data", server={"metrics_auth": True})
    Runtime.open(settings).close()  # writes the development credentials
    token = json.loads(settings.dev_credentials_file.read_text())["dev-auditor"]
    server = serve_metrics("127.0.0.1", 0, metrics_credentials(settings))
    try:
        assert server.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        assert get(url) == 401
        assert get(url, "not-a-token") == 401
        assert get(url, token) == 200
    finally:
        server.shutdown()
        server.server_close()
    open_server = serve_metrics("127.0.0.1", 0)
    try:
        assert get(f"http://127.0.0.1:{open_server.server_port}/metrics") == 200
    finally:
        open_server.shutdown()
        open_server.server_close()
