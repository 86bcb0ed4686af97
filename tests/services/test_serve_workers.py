"""`biogate serve face` with server.face.workers 2 (the service's own setting over server.workers):
two processes on one port, each answering, SERVING once both are warm, the metrics endpoint counting the calls of both, both drained on SIGTERM."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
from services.common.config import PROJECT_ROOT
from services.serve import health_status
from services.settings import load_config
from tests.services.test_serve_cli import free_ports


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


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
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            return dict(err.initial_metadata())["x-biogate-worker"]


def scrape(port: int) -> dict[str, list]:
    """The samples of each metric family on the metrics endpoint, by family name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_serve_face_with_two_workers_answers_from_both_and_drains_on_sigterm(tmp_path):
    port, metrics_port = free_ports(2)
    data = tmp_path / "data"
    env = dict(os.environ, BIOGATE_DATA_DIR=str(data), BIOGATE_MODELS__CACHE_DIR=str(PROJECT_ROOT / "var" / "models"),
               BIOGATE_SERVER__FACE__WORKERS="2", BIOGATE_SERVER__FACE__PORT=str(port),
               BIOGATE_SERVER__FACE__METRICS_PORT=str(metrics_port))
    target = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "face"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    pids: set[str] = set()
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready, "no worker group became SERVING within 300 s"
        assert proc.stdout.readline().strip() == f"biogate: face SERVING on {target} (2 workers)"
        # the parent prints once both counted themselves warm; each then turns SERVING on its own thread
        deadline = time.monotonic() + 10
        while health_status(target) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(target) == "SERVING"
        token = json.loads(load_config(None, data_dir=str(data)).dev_credentials_file.read_text())["dev-all"]
        calls: dict[str, int] = {}
        for _ in range(60):
            pid = answering_worker(target, token)
            calls[pid] = calls.get(pid, 0) + 1
            if len(calls) == 2 and sum(calls.values()) >= 6:
                break
        pids = set(calls)
        assert len(pids) == 2, f"every connection reached the same worker: {pids}"
        assert all(parent_of(int(p)) == proc.pid for p in pids)
        # The first worker serves the scrapes: it must count the calls that both answered.
        metrics = scrape(metrics_port)
        verifies = [s for s in metrics["biogate_rpc"] if s.name == "biogate_rpc_total" and s.labels["method"] == "Verify"]
        assert [s.labels["code"] for s in verifies] == ["INVALID_ARGUMENT"]
        assert verifies[0].value == sum(calls.values()), (verifies, calls)
        assert [s.value for s in metrics["biogate_rpc_in_flight"] if s.labels["service"] == "face"] == [0.0]
        assert any("face_models" in s.labels for s in metrics["biogate_model_info"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=90)
    assert proc.returncode == 0
    assert health_status(target) == "UNAVAILABLE"
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
