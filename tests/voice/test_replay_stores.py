"""The replay cache's stores as the voice service opens them (voice.replay_store): the database
table shared by replicas (SQLite and PostgreSQL), Redis and one process's memory. Erasure through
the service's DeleteSubject leaves no fingerprint behind in any of them; a configured Redis that
cannot be reached stops the service at start-up, naming the setting."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest
import redis

from services.common.api.v1 import common_pb2, voice_pb2_grpc
from services.common.client import connect
from services.common.config import PROJECT_ROOT
from services.common.server.bootstrap import RunningServer
from services.common.storage import open_storage
from services.voice import replay
from services.voice.server import definition
from tests.conftest import make_settings


def capture(seed: int) -> np.ndarray:
    """Three seconds of band-limited noise bursts: fingerprints of something, not of anyone."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(48000).astype(np.float32) * 0.1
    return x * (np.sin(np.arange(48000) / 1600.0) > 0)


def test_the_database_store_keeps_the_window_and_cap_and_replicas_share_it(storage_dsn):
    now = [5000.0]
    a, b = open_storage(storage_dsn), open_storage(storage_dsn)  # two processes' connections to one database
    try:
        one = replay.DatabaseReplayStore(a, 60, 3, clock=lambda: now[0])
        other = replay.DatabaseReplayStore(b, 60, 3, clock=lambda: now[0])
        for i in range(5):
            (one if i % 2 else other).add("t", "ps1_a", bytes([i]) * 4)
            now[0] += 1
        other.add("t", "ps1_b", b"bb")
        assert one.recent("t", "ps1_a") == [bytes([i]) * 4 for i in (2, 3, 4)]  # newest three, either replica's
        now[0] += 58.5  # the records of 5002 and 5003 fell out of the window
        assert other.recent("t", "ps1_a") == [bytes([4]) * 4]
        assert one.erase("t", "ps1_a") == 3 and other.recent("t", "ps1_a") == []
        now[0] += 61
        one.add("t", "ps1_c", b"c")  # an insert also drops everyone's expired records
        with a.db.read() as s:
            assert s.all("SELECT subject_key FROM voice_replay ORDER BY subject_key") == [("ps1_c",)]
    finally:
        a.close()
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["database-sqlite", "database-postgres", "redis", "memory"])
def store_settings(request, tmp_path):
    prefix = f"biogate-test:{uuid.uuid4().hex[:10]}"
    dsn, spec = "", request.param
    if spec == "database-postgres":
        dsn = request.getfixturevalue("pg_dsn")
    if spec.startswith("database"):
        spec = "database"
    if spec == "redis":
        spec = "redis://127.0.0.1:6379/0"
        redis.Redis.from_url(spec).ping()
    yield make_settings(tmp_path / "data", storage={"dsn": dsn}, voice={"replay_store": spec, "replay_key_prefix": prefix})
    if spec.startswith("redis"):
        client = redis.Redis.from_url(spec)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


def left_behind(settings, cache: replay.ReplayCache, tenant: str, pseudonym: str) -> int:
    store = cache.store
    if isinstance(store, replay.DatabaseReplayStore):
        with store.repo._db.read() as s:
            return s.one("SELECT count(*) FROM voice_replay WHERE tenant_id = ? AND subject_key = ?",
                         (tenant, pseudonym))[0]
    if isinstance(store, replay.RedisReplayStore):
        return int(store.client.exists(store.key(tenant, pseudonym)))
    assert isinstance(store, replay.MemoryReplayStore)
    return len(store._items.get((tenant, pseudonym), []))


def test_delete_subject_erases_the_fingerprints_in_the_configured_store(store_settings):
    d = definition(store_settings)
    running = RunningServer(store_settings, d, port=0)
    running.server.start()  # RPCs without the models: erasure needs none
    try:
        cache = d.service.replay
        rt = d.service.rt
        for subject, seed in (("cust-1", 1), ("cust-1", 2), ("cust-2", 3)):
            cache.remember("bank-a", subject, replay.fingerprint(capture(seed)))
        gone, kept = rt.pseudonymize("bank-a", "cust-1"), rt.pseudonymize("bank-a", "cust-2")
        assert left_behind(store_settings, cache, "bank-a", gone) >= 1
        tokens = json.loads(rt.settings.dev_credentials_file.read_text())
        with connect(running.address, tokens["dev-admin"]) as channel:
            voice_pb2_grpc.VoiceServiceStub(channel).DeleteSubject(common_pb2.DeleteSubjectRequest(
                subject=common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-1"), reason="erasure-request"))
        assert left_behind(store_settings, cache, "bank-a", gone) == 0
        assert left_behind(store_settings, cache, "bank-a", kept) == 1
        assert cache.best_match("bank-a", "cust-2", replay.fingerprint(capture(3))) > 0.99
    finally:
        running.stop(grace=0)


def test_an_unreachable_redis_stops_the_voice_service_naming_the_setting(tmp_path):
    env = dict(os.environ, BIOGATE_DATA_DIR=str(tmp_path / "data"),
               BIOGATE_VOICE__REPLAY_STORE="redis://:s3cret@127.0.0.1:1/0",
               BIOGATE_SERVER__VOICE__PORT=str(free_port()), BIOGATE_SERVER__VOICE__METRICS_PORT=str(free_port()),
               BIOGATE_MODELS__CACHE_DIR=str(PROJECT_ROOT / "var" / "models"))
    proc = subprocess.run([sys.executable, "-m", "services.cli", "serve", "voice"], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "voice.replay_store redis://:***@127.0.0.1:1/0: Redis cannot be reached" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
    with pytest.raises(replay.ReplayStoreError, match="expected 'database', 'memory' or a redis:// URL"):
        replay.open_store("memcached://x", 60, 3)


def test_the_embedded_default_needs_no_redis(tmp_path):
    settings = make_settings(tmp_path / "data")
    assert settings.voice.replay_store == "database"
    d = definition(settings)
    try:
        assert isinstance(d.service.replay.store, replay.DatabaseReplayStore)
    finally:
        d.close()
