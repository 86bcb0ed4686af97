"""One worker of a group (server.workers > 1) on a real gRPC server: warm, it stays NOT_SERVING until
every worker of the group is warm, then turns SERVING; stopping while it waits ends the wait."""

from __future__ import annotations

import multiprocessing
import threading
import time

from services.common.server.bootstrap import RunningServer, ServiceDefinition
from services.common.server.workers import Worker
from services.serve import health_status


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def one_of_two(settings) -> tuple[RunningServer, Worker]:
    ctx = multiprocessing.get_context("spawn")
    worker = Worker(0, 2, ctx.Value("i", 0), ctx.Event())
    server = RunningServer(settings, ServiceDefinition("face", [], lambda _server: None), port=0, worker=worker)
    return server.start(), worker


def test_a_warm_worker_serves_only_once_the_whole_group_is_warm(settings):
    server, worker = one_of_two(settings)
    try:
        wait_until(lambda: worker.ready.value == 1, "the worker never counted itself warm")
        assert health_status(server.address) == "NOT_SERVING"  # its sibling is still cold
        assert not server.ready.is_set()
        worker.ready.value += 1  # the sibling warms up; the parent sees the whole group warm
        worker.all_warm.set()
        assert server.ready.wait(30)
        assert health_status(server.address) == "SERVING"
    finally:
        server.stop(grace=0)


def test_a_worker_stopped_while_waiting_for_its_group_never_serves(settings):
    server, worker = one_of_two(settings)
    wait_until(lambda: worker.ready.value == 1, "the worker never counted itself warm")
    server.stop(grace=0)
    wait_until(lambda: not any(t.name == "face-warmup" for t in threading.enumerate()),
               "the warm-up thread still waits for its group after stop")
    worker.all_warm.set()
    assert not server.ready.is_set()
