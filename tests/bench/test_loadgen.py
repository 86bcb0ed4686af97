import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from bench.harness import peak_rss_mb
from bench.loadgen import aio_channel, assert_loopback, run_load
from tests.conftest import health_check


def test_only_loopback_targets_are_allowed():
    assert_loopback("127.0.0.1:50051")
    assert_loopback("[::1]:50051")
    assert_loopback("localhost:1")
    for target in ("10.0.0.5:50051", "192.168.1.2:1", "8.8.8.8:53"):
        with pytest.raises(ValueError):
            assert_loopback(target)


def test_the_run_stops_at_its_request_budget_and_counts_errors(services):
    server = services.start("mfa")

    async def main():
        async with aio_channel(server.address, None) as channel:
            health = health_check(channel)
            ok = await run_load(lambda: health(health_pb2.HealthCheckRequest()),
                                 concurrency=4,
                                duration_s=30, max_requests=50)
            bad = await run_load(lambda: health(health_pb2.HealthCheckRequest(service="nope")),
                                 concurrency=2, duration_s=30, max_requests=10)
        return ok, bad

    ok, bad = asyncio.run(main())
    assert ok.ok == 50 and not ok.errors and ok.percentile(99) >= ok.percentile(50) > 0
    assert bad.ok == 0 and bad.errors == {grpc.StatusCode.NOT_FOUND.name: 10}


def test_the_run_stops_at_its_time_budget():
    async def slow():
        await asyncio.sleep(0.05)

    result = asyncio.run(run_load(slow, concurrency=2, duration_s=0.3, max_requests=10_000))
    assert 1 <= result.ok <= 16  # stopped by the 0.3 s budget, not by max_requests


def test_peak_rss_reads_proc():
    import os

    assert peak_rss_mb(os.getpid()) > 10


def test_the_open_loop_issues_at_its_rate_whatever_the_answers_and_records_each_outcome():
    from bench.loadgen import run_open_loop
    from services.common.errors import resource_exhausted

    refusal = resource_exhausted("busy", "QUEUE_FULL")
    refusal.retry_delay_s = 0.25
    status = refusal.to_status()

    async def call(i: int, timeout: float):
        assert timeout == 2.0
        if i % 2:
            raise grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata),
                                       status.details)
        await asyncio.sleep(0.5)  # slower than the issue interval: the loop does not wait for it

    result = asyncio.run(run_open_loop(call, rate_per_s=40, duration_s=0.5, deadline_s=2.0, max_requests=1000))
    d = result.as_dict()
    assert d["issued"] == 20 and d["codes"] == {"OK": 10, "RESOURCE_EXHAUSTED": 10}
    assert d["reasons"] == {"QUEUE_FULL": 10} and d["refused_with_retry_hint"] == 10
    assert all(o.retry_delay_s == 0.25 for o in result.refused())
    assert len(result.passed()) == 10 and result.passed_rate() == 20.0
    assert max(o.issued_s for o in result.outcomes) < 0.5 + 0.4  # all issued before the first answers came


def test_the_open_loop_at_a_share_of_a_closed_loop_rate_reports_its_tail_ratio():
    from bench.loadgen import OPEN_LOOP_SHARE, open_loop_at_share, open_loop_line

    async def call(i: int, timeout: float):
        await asyncio.sleep(0.01 * (i % 3))

    result = asyncio.run(open_loop_at_share(call, 50.0, duration_s=0.5, deadline_s=5.0))
    assert OPEN_LOOP_SHARE == 0.8 and result.rate_per_s == 40.0
    assert len(result.outcomes) == 20 and len(result.passed()) == 20  # 40/s for 0.5 s, all answered
    d = result.as_dict()
    assert d["passed_p99_over_p50"] == round(result.tail_ratio(), 2) and result.tail_ratio() >= 1.0
    assert "p99/p50" in open_loop_line(result)
    with pytest.raises(ValueError):
        asyncio.run(open_loop_at_share(call, 0.0, duration_s=0.5, deadline_s=5.0))
