"""The MFA's client to a multi-worker face service: throughput with one connection against several.

`biogate serve face` with server.workers W (its own process, default models, a temporary data
dir, face_bench's subjects enrolled); then, in this process, the MFA's own client
(services/mfa/clients.py BiometricClient, service token) calls Verify with face_bench's plain
requests from ``concurrency`` threads for ``duration`` s, once per entry of ``--connections`` and
that sequence ``--rounds`` times over (A/B/A/B: drift in the shared machine's load hits both),
/proc/loadavg printed before each run, each worker's CPU seconds after it (the kernel spreads
connections, not calls, over the workers).

    .venv/bin/python -m bench.client_connections [--workers 2] [--connections 1 8] [--rounds 2]
        [--concurrency 8] [--duration 20] [--open-seconds 0]

With ``--open-seconds`` S each run is followed by issue 13's tail check through the same client: Verify
issued at fixed intervals for S s at 80 % of that run's closed-loop rate, whatever the answers (a pool
of threads sends them), each latency counted from its scheduled time.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.face_bench import enrol, plain_requests, trial_pairs
from bench.harness import ServiceProcess, child_pids, cpu_seconds, pct
from services.common.api.v1 import face_pb2_grpc
from services.mfa.clients import BiometricClient
from services.mfa.config import ClientTarget


class Tally:
    """The MFA's client to the service, and what its Verify calls came to: latencies of the matches
    (from the times given), errors by kind."""

    def __init__(self, svc: ServiceProcess, connections: int) -> None:
        self.client = BiometricClient("face", svc.address, svc.token("dev-service"),
                                      ClientTarget(connections=connections), face_pb2_grpc.FaceServiceStub, 16 << 20)
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self._lock = threading.Lock()

    def verify(self, request, since: float) -> None:
        try:
            reply = self.client.call("Verify", request, idempotent=True)
            outcome = None if reply.match else "no_match"
        except Exception as exc:  # counted and reported, whatever it is
            outcome = type(exc).__name__
        with self._lock:
            if outcome is None:
                self.latencies.append(time.perf_counter() - since)
            else:
                self.errors[outcome] = self.errors.get(outcome, 0) + 1


def load(svc: ServiceProcess, requests: list, connections: int, concurrency: int, duration: float) -> tuple:
    """(latencies, wall s, errors by kind) of ``concurrency`` threads calling Verify for ``duration`` s."""
    tally = Tally(svc, connections)
    stop_at = time.monotonic() + duration

    def worker(k: int) -> None:
        for i in itertools.count(k, concurrency):
            if time.monotonic() >= stop_at:
                return
            tally.verify(requests[i % len(requests)], time.perf_counter())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    tally.client.close()
    return tally.latencies, wall, tally.errors


def open_load(svc: ServiceProcess, requests: list, connections: int, rate: float, duration: float) -> tuple:
    """(latencies, errors by kind) of Verify issued every 1/``rate`` s for ``duration`` s."""
    tally = Tally(svc, connections)
    with ThreadPoolExecutor(max_workers=64) as pool:
        t0 = time.perf_counter()
        for i in range(int(rate * duration)):
            due = t0 + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(tally.verify, requests[i % len(requests)], due)
    tally.client.close()
    return tally.latencies, tally.errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="server.workers of the face service")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8], help="clients.face.connections, in turn")
    ap.add_argument("--rounds", type=int, default=2, help="times the --connections sequence is run")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    ap.add_argument("--open-seconds", type=float, default=0.0, help="after each run, an open loop at 80 %% of its rate")
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
                    if args.open_seconds > 0:
                        rate = 0.8 * len(lat) / wall
                        olat, oerrs = open_load(svc, requests, n, rate, args.open_seconds)
                        p50, p99 = pct(olat, 50), pct(olat, 99)
                        print(f"  open loop at {rate:.1f}/s for {args.open_seconds:.0f} s: {len(olat)} ok, p50 {p50:.1f} ms "
                              f"p99 {p99:.1f} ms, p99/p50 {p99 / p50:.2f}, errors {oerrs}", flush=True)
        finally:
            svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
