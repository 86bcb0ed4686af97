"""The MFA's client to a multi-worker face service: throughput with one connection against several.

`biogate serve face` with server.workers W (its own process, default models, a temporary data
dir, face_bench's subjects enrolled); then, in this process, the MFA's own client
(services/mfa/clients.py BiometricClient, orchestrator token) calls Verify with face_bench's plain
requests from ``concurrency`` threads for ``duration`` s, once per entry of ``--connections`` and
that sequence ``--rounds`` times over (A/B/A/B: drift in the shared machine's load hits both),
/proc/loadavg printed before each run, each worker's CPU seconds after it (the kernel spreads
connections, not calls, over the workers).

    .venv/bin/python -m bench.client_connections [--workers 2] [--connections 1 8] [--rounds 2]
        [--concurrency 8] [--duration 20]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.face_bench import enrol, plain_requests, trial_pairs
from bench.harness import ServiceProcess, child_pids, cpu_seconds, pct
from services.common.api.v1 import face_pb2_grpc
from services.mfa.clients import BiometricClient
from services.mfa.config import ClientTarget


def load(svc: ServiceProcess, requests: list, connections: int, concurrency: int, duration: float) -> tuple:
    """(latencies, wall s, errors by kind) of ``concurrency`` threads calling Verify for ``duration`` s."""
    client = BiometricClient("face", svc.address, svc.token("dev-orchestrator"), ClientTarget(connections=connections),
                             face_pb2_grpc.FaceServiceStub, 16 * 1024 * 1024)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker(k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            try:
                reply = client.call("Verify", requests[i % len(requests)], idempotent=True)
                outcome = None if reply.match else "no_match"
            except Exception as exc:  # counted and reported, whatever it is
                outcome = type(exc).__name__
            with lock:
                if outcome is None:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    client.close()
    return latencies, wall, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="server.workers of the face service")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8], help="clients.face.connections, in turn")
    ap.add_argument("--rounds", type=int, default=2, help="times the --connections sequence is run")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    args = ap.parse_args()

    images, pairs = trial_pairs()
    datas = [p.read_bytes() for p in images]
    requests = plain_requests(datas, pairs)
    with tempfile.TemporaryDirectory(prefix="client-connections-") as tmp:
        svc = ServiceProcess("face", {"server": {"workers": args.workers}}, data_dir=Path(tmp))
        try:
            svc.start()
            enrol(svc, datas)[0].close()
            load(svc, requests, max(args.connections), args.concurrency, 3.0)  # warm every worker's path
            assert svc.proc is not None
            # the worker processes: spawned, so beside them the parent has multiprocessing's resource tracker
            workers = [pid for pid in child_pids(svc.proc.pid)
                       if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()] or [svc.proc.pid]
            for r in range(args.rounds):
                for n in args.connections:
                    loadavg = Path("/proc/loadavg").read_text().split()[:3]
                    before = {pid: cpu_seconds(pid) for pid in workers}
                    lat, wall, errs = load(svc, requests, n, args.concurrency, args.duration)
                    used = sorted((cpu_seconds(pid) - before[pid] for pid in workers), reverse=True)
                    print(f"round {r + 1} connections {n}: load {' '.join(loadavg)}; {len(lat)} ok in {wall:.1f} s = "
                          f"{len(lat) / wall:.1f}/s, p50 {pct(lat, 50):.1f} ms p99 {pct(lat, 99):.1f} ms, "
                          f"errors {errs}; workers' CPU s {' '.join(f'{u:.1f}' for u in used)}", flush=True)
        finally:
            svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
