"""`biogate serve all` as `make run` starts it: three processes, each SERVING, drained on SIGTERM."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

from services.common.config import PROJECT_ROOT
from services.serve import SERVICES, health_status


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_serve_all_brings_up_three_serving_services_and_drains_on_sigterm(tmp_path):
    ports = free_ports(6)
    env = dict(os.environ, BIOGATE_DATA_DIR=str(tmp_path / "data"),
               BIOGATE_MODELS__CACHE_DIR=str(PROJECT_ROOT / "var" / "models"), BIOGATE_MFA__HTTP__PORT="0")
    targets = {}
    for i, name in enumerate(SERVICES):
        env[f"BIOGATE_SERVER__{name.upper()}__PORT"] = str(ports[i])
        env[f"BIOGATE_SERVER__{name.upper()}__METRICS_PORT"] = str(ports[3 + i])
        targets[name] = f"127.0.0.1:{ports[i]}"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "all"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    printed: list[str] = []
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 240
        while len(printed) < len(SERVICES) and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                assert line, "serve all exited early"
                printed.append(line.strip())
        assert sorted(printed) == sorted(f"biogate: {n} SERVING on {t}" for n, t in targets.items())
        assert {n: health_status(t) for n, t in targets.items()} == {n: "SERVING" for n in SERVICES}
        metrics = subprocess.run(["curl", "-s", f"http://127.0.0.1:{ports[5]}/metrics"], capture_output=True, text=True)
        assert "biogate_rpc" in metrics.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert all(health_status(t) == "UNAVAILABLE" for t in targets.values())
