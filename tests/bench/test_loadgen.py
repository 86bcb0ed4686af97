import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import peak_rss_mb
from bench.loadgen import aio_channel, assert_loopback, run_load


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
            health = health_pb2_grpc.HealthStub(channel)
            ok = await run_load(lambda: health.Check(health_pb2.HealthCheckRequest()), concurrency=4,
                                duration_s=30, max_requests=50)
            bad = await run_load(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")),
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
