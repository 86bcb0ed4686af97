"""`biogate serve face` with server.face.workers 2 (the service's own setting over server.workers):
two processes on one port, each answering, SERVING once both are warm, the metrics endpoint counting the calls of both, both drained on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import errors
from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
from services.common.config import PROJECT_ROOT
from services.mfa.clients import BiometricClient
from services.mfa.config import ClientTarget
from services.serve import health_status
from services.settings import load_config
from tests.services.test_serve_cli import free_ports


def pid_of(worker: str) -> int:
    """The process id in an x-biogate-worker header (host/pid), checked to name this host."""
    host, pid = worker.rsplit("/", 1)
    assert host == socket.gethostname(), worker
    return int(pid)


def parent_of(worker: str) -> int:
    return int(Path(f"/proc/{pid_of(worker)}/stat").read_text().rsplit(")", 1)[1].split()[1])


def answering_worker(target: str, token: str) -> str:
    """The x-biogate-worker header of one call on a connection of its own."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a new TCP connection: the kernel picks a worker anew
    with grpc.insecure_channel(target, options=options) as channel:
        stub = face_pb2_grpc.FaceServiceStub(channel)
        request = face_pb2.VerifyFaceRequest(subject=common_pb2.SubjectRef(tenant_id="t", subject_id="s"))
        try:
            stub.Verify(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
            raise AssertionError("a Verify without an image was accepted")
        except grpc.RpcError as err:
            assert isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            return dict(err.initial_metadata())["x-biogate-worker"]


def scrape(port: int) -> dict[str, list]:
    """The samples of each metric family on the metrics endpoint, by family name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@contextlib.contextmanager
def face_with_two_workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, Path, int]]:
    """`biogate serve face` with server.workers 2, both warm and SERVING: (process, target, data
    dir, metrics port); SIGTERM on the way out."""
    port, metrics_port = free_ports(2)
    data = tmp_path / "data"
    env = dict(os.environ, BIOGATE_DATA_DIR=str(data), BIOGATE_MODELS__CACHE_DIR=str(PROJECT_ROOT / "var" / "models"),
               BIOGATE_SERVER__FACE__WORKERS="2", BIOGATE_SERVER__FACE__PORT=str(port),
               BIOGATE_SERVER__FACE__METRICS_PORT=str(metrics_port))
    target = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "face"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready, "no worker group became SERVING within 300 s"
        assert proc.stdout.readline().strip() == f"biogate: face SERVING on {target} (2 workers)"
        # the parent prints once both counted themselves warm; each then turns SERVING on its own thread
        deadline = time.monotonic() + 10
        while health_status(target) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(target) == "SERVING"
        yield proc, target, data, metrics_port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=90)


def dev_token(data: Path, name: str) -> str:
    return json.loads(load_config(None, data_dir=str(data)).dev_credentials_file.read_text())[name]


def test_serve_face_with_two_workers_answers_from_both_and_drains_on_sigterm(tmp_path):
    pids: set[str] = set()
    with face_with_two_workers(tmp_path) as (proc, target, data, metrics_port):
        token = dev_token(data, "dev-all")
        calls: dict[str, int] = {}
        for _ in range(60):
            pid = answering_worker(target, token)
            calls[pid] = calls.get(pid, 0) + 1
            if len(calls) == 2 and sum(calls.values()) >= 6:
                break
        pids = set(calls)
        assert len(pids) == 2, f"every connection reached the same worker: {pids}"
        assert all(parent_of(p) == proc.pid for p in pids)
        # The first worker serves the scrapes: it must count the calls that both answered.
        metrics = scrape(metrics_port)
        verifies = [s for s in metrics["biogate_rpc"] if s.name == "biogate_rpc_total" and s.labels["method"] == "Verify"]
        assert [s.labels["code"] for s in verifies] == ["INVALID_ARGUMENT"]
        assert verifies[0].value == sum(calls.values()), (verifies, calls)
        assert [s.value for s in metrics["biogate_rpc_in_flight"] if s.labels["service"] == "face"] == [0.0]
        assert any("face_models" in s.labels for s in metrics["biogate_model_info"])
    assert proc.returncode == 0
    assert health_status(target) == "UNAVAILABLE"
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid_of(p)}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid_of(p)}").exists() for p in pids)


def workers_reached(client: BiometricClient, calls: int = 20) -> set[str]:
    """The x-biogate-worker of ``calls`` cheap calls (Verify without an image), each on the
    connection the client gives its next call."""
    request = face_pb2.VerifyFaceRequest(subject=common_pb2.SubjectRef(tenant_id="t", subject_id="s"))
    seen: set[str] = set()
    for _ in range(calls):
        with client.connections.take() as stub:
            try:
                stub.Verify(request, timeout=30)
                raise AssertionError("a Verify without an image was accepted")
            except grpc.RpcError as err:
                assert isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                seen.add(dict(err.initial_metadata())["x-biogate-worker"])
    return seen


def test_the_mfa_client_spreads_its_calls_over_the_workers_by_opening_several_connections(tmp_path):
    with face_with_two_workers(tmp_path) as (proc, target, data, _):
        token = dev_token(data, "dev-service")

        def client(connections: int) -> BiometricClient:
            return BiometricClient("face", target, token, ClientTarget(connections=connections),
                                   face_pb2_grpc.FaceServiceStub, 1 << 24)

        one = client(1)
        try:
            assert len(workers_reached(one)) == 1  # one connection: one worker, however many calls
        finally:
            one.close()
        # Sequential calls go round all 8 connections, and the kernel puts each on either worker
        # at random: all on one of the two 1 time in 128, so fresh clients are tried up to 4 times
        # (all failing about once in 3e8 runs).
        seen: set[str] = set()
        for _ in range(4):
            eight = client(8)
            try:
                seen = workers_reached(eight)
                with pytest.raises(errors.ServiceError) as refused:  # and the client's own calls take them
                    eight.call("Verify", face_pb2.VerifyFaceRequest(), idempotent=True)
                assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert eight.breaker.state == "closed"
            finally:
                eight.close()
            if len(seen) == 2:
                break
        assert len(seen) == 2, f"8 connections reached one worker 4 times over: {seen}"
        assert all(parent_of(p) == proc.pid for p in seen)

        # Once answers named the workers, a call goes to the least busy worker, not just the least
        # busy connection: with one call in flight, the next goes to the other worker, whichever
        # idle connections of the busy one come first in turn.
        # (Fresh clients until one has connections on both workers, as above.) Checked 8 times: going
        # by connections alone, the second call's connection is on the busy worker 3 times in 7.
        for _ in range(4):
            pool = client(8)
            for _ in range(16):
                with pytest.raises(errors.ServiceError):
                    pool.call("Verify", face_pb2.VerifyFaceRequest(), idempotent=False)
            if pool.connections.workers() == seen:
                break
            pool.close()
        try:
            assert pool.connections.workers() == seen
            for _ in range(8):
                with pool.connections.take() as busy, pool.connections.take() as other:
                    assert pool.connections.worker_of(busy) != pool.connections.worker_of(other)
        finally:
            pool.close()
