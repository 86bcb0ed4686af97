"""Several processes serving one service on one port (``server.workers``).

One Python process leaves cores idle under the GIL (issue 13), so `biogate serve` can start N worker
processes that each bind the service's port with SO_REUSEPORT (the kernel spreads connections over
them), load their own models and share every state through the database, Redis and the keyring.
A worker turns SERVING only when every worker is warm: health checks land on any of them, and one
cold process behind a SERVING answer would fail the calls routed to it. The parent only supervises:
a worker that exits stops the others (the orchestrator restarts the whole), SIGTERM drains them all.

Metrics: each start gets a fresh directory (under PROMETHEUS_MULTIPROC_DIR when it is set, else the
temporary directory) in which every worker's prometheus-client writes its values (multiprocess
mode); the first worker's metrics endpoint merges them, and a worker's live gauges go with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import multiprocess

log = logging.getLogger("biogate.workers")

POLL_S = 0.2


@dataclass
class Worker:
    """What one worker process knows of its group: its index, and the group's readiness."""

    index: int
    count: int
    ready: Any  # multiprocessing Value('i'): how many workers are warm
    all_warm: Any  # multiprocessing Event: set by the parent once ``ready`` reaches ``count``
    metrics_dir: str | None = None  # the group's PROMETHEUS_MULTIPROC_DIR

    def wait_for_all(self, stopping: threading.Event) -> bool:
        """Counts this worker warm, then waits until every worker is (False: stopping first)."""
        with self.ready.get_lock():
            self.ready.value += 1
        while not self.all_warm.wait(POLL_S):
            if stopping.is_set():
                return False
        return True

    @property
    def label(self) -> str:
        """What each response's ``x-biogate-worker`` header carries: the process that answered, as
        host/pid. The host name (a pod's name) keeps the workers of replicas apart, whose process ids
        in their containers are alike, for a client that balances its calls by worker (the MFA's)."""
        return f"{socket.gethostname()}/{os.getpid()}"


def run_workers(settings, name: str, target: Callable[[Any, str, Worker], None]) -> int:
    """Starts ``settings.server.processes(name)`` processes running ``target(settings, name, worker)`` and
    supervises them until SIGTERM/SIGINT or one exits; returns the highest exit status."""
    count = settings.server.processes(name)
    ctx = multiprocessing.get_context("spawn")  # no forked copies of gRPC's or onnxruntime's threads
    ready, all_warm = ctx.Value("i", 0), ctx.Event()
    # A fresh directory: files left by an earlier start would count its calls again. The spawned
    # workers read the variable when they import prometheus_client; this process records nothing.
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = tempfile.mkdtemp(prefix=f"biogate-{name}-metrics-", dir=before)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _supervise(settings, name, target, ctx, ready, all_warm, count, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        # a process started later must not write into the removed directory
        if before is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = before


def _supervise(settings, name: str, target: Callable[[Any, str, Worker], None], ctx, ready, all_warm, count: int,
               metrics_dir: str) -> int:
    procs = [ctx.Process(target=target, args=(settings, name, Worker(i, count, ready, all_warm, metrics_dir)),
                         name=f"{name}-worker-{i}") for i in range(count)]
    stopping = threading.Event()

    def stop(signum, _frame) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.start()
    endpoint = settings.endpoint(name)
    while not stopping.is_set():
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            log.error("worker exited; stopping the others", extra={"service": name, "worker": dead[0].name,
                                                                    "rc": dead[0].exitcode})
            break
        if not all_warm.is_set() and ready.value >= count:
            all_warm.set()
            print(f"biogate: {name} SERVING on {endpoint.host}:{endpoint.port} ({count} workers)", flush=True)
        stopping.wait(POLL_S)
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + settings.server.drain_seconds + 30.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.error("worker did not stop; killing it", extra={"service": name, "worker": p.name})
            p.kill()
            p.join()
        if p.pid is not None:
            multiprocess.mark_process_dead(p.pid, metrics_dir)
    return max(abs(p.exitcode or 0) for p in procs)
