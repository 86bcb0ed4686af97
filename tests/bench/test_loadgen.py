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


def refused_call(reason: str = "QUEUE_FULL") -> grpc.aio.AioRpcError:
    from services.common.errors import resource_exhausted

    refusal = resource_exhausted("busy", reason)
    refusal.retry_delay_s = 0.25
    status = refusal.to_status()
    return grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata),
                                status.details)


def test_refusals_are_counted_apart_and_do_not_spend_the_request_budget():
    """bench/RESULTS.md (issue 13): a closed loop that re-sent each admission refusal at once ended its
    level of 200 requests after 172 refusals and 22 answers. The budget is of answered calls; the
    refusals are reported apart, by reason."""
    calls = {"n": 0}

    async def call():
        calls["n"] += 1
        n = calls["n"]
        await asyncio.sleep(0)
        if n <= 30:
            raise refused_call()
        if n % 7 == 0:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad")

    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    result = asyncio.run(run_load(call, concurrency=4, duration_s=30, max_requests=20, sleep=sleep))
    assert waits == [0.25] * 30  # each refusal's retry hint waited out before the next call, as a client does
    assert result.ok + sum(result.errors.values()) == 20 and calls["n"] == 50
    assert result.refused == {"QUEUE_FULL": 30} and set(result.errors) == {"INVALID_ARGUMENT"}
    d = result.as_dict()
    assert d["refused"] == {"QUEUE_FULL": 30} and "RESOURCE_EXHAUSTED" not in d["errors"]
    assert "30 refused" in result.summary()


def test_the_budget_gives_a_refused_calls_place_back_and_stops_at_its_time():
    from bench.loadgen import RequestBudget

    now = [0.0]
    budget = RequestBudget(2, 10.0, clock=lambda: now[0])
    assert budget.take() and budget.take() and not budget.take()  # two in flight: the answers due are sent for
    assert budget.done(refused_call("DEADLINE_UNREACHABLE")) and budget.take()  # its place back
    assert not budget.done() and not budget.done() and not budget.take()
    assert (budget.answered, budget.in_flight, dict(budget.refused)) == (2, 0, {"DEADLINE_UNREACHABLE": 1})
    budget = RequestBudget(5, 10.0, clock=lambda: now[0])
    now[0] = 10.0
    assert not budget.take()


def test_a_refusals_wait_ends_with_the_budgets_time():
    from bench.loadgen import RequestBudget

    now, waits = [0.0], []

    async def sleep(s: float) -> None:
        waits.append(s)

    budget = RequestBudget(5, 10.0, clock=lambda: now[0], sleep=sleep)
    now[0] = 9.9
    asyncio.run(budget.back_off(refused_call()))  # hint 0.25 s, 0.1 s left
    now[0] = 11.0
    asyncio.run(budget.back_off(refused_call()))
    assert waits == pytest.approx([0.1, 0.0])


class Refusing:
    """A loopback gRPC server's Verify (face and voice) that refuses the first ``refusals`` calls with
    admission's RESOURCE_EXHAUSTED and answers the rest."""

    def __init__(self, refusals: int) -> None:
        self.left, self.calls = refusals, 0

    async def answer(self, reply, context):
        self.calls += 1
        if self.left:
            self.left -= 1
            from services.common.errors import resource_exhausted

            status = resource_exhausted("busy", "DEADLINE_UNREACHABLE").to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        return reply


async def serving(refusing: Refusing) -> tuple[grpc.aio.Server, str]:
    from services.common.api.v1 import face_pb2, face_pb2_grpc, voice_pb2, voice_pb2_grpc

    class Face(face_pb2_grpc.FaceServiceServicer):
        async def Verify(self, request, context):
            return await refusing.answer(face_pb2.VerifyFaceResponse(match=True), context)

    class Voice(voice_pb2_grpc.VoiceServiceServicer):
        async def Verify(self, request, context):
            return await refusing.answer(voice_pb2.VerifyVoiceResponse(match=True), context)

    server = grpc.aio.server()
    face_pb2_grpc.add_FaceServiceServicer_to_server(Face(), server)
    voice_pb2_grpc.add_VoiceServiceServicer_to_server(Voice(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_the_face_and_voice_benches_count_answered_calls_and_refusals_apart():
    from bench import face_bench, voice_bench
    from services.common.api.v1 import face_pb2, voice_pb2

    async def main():
        face, voice = Refusing(12), Refusing(12)
        server, address = await serving(face)
        try:
            face_run = await face_bench.run_load(address, "t", [face_pb2.VerifyFaceRequest()], 3, 30.0, 10)
            server2, address2 = await serving(voice)
            try:
                voice_run = await voice_bench.load(address2, "t", "bank-a", [], [], 3, 30.0, 10,
                                                   send=lambda stub, k, meta, timeout: stub.Verify(
                                                       voice_pb2.VerifyVoiceRequest(), metadata=meta, timeout=timeout))
            finally:
                await server2.stop(None)
        finally:
            await server.stop(None)
        return face_run, voice_run, voice.calls

    face_run, voice_run, voice_calls = asyncio.run(main())
    assert face_run.ok == 10 and not face_run.errors and face_run.refused == {"DEADLINE_UNREACHABLE": 12}
    assert (voice_run["requests"], voice_run["errors"], voice_run["refused"]) == (10, {}, {"DEADLINE_UNREACHABLE": 12})
    assert voice_calls == 22 and voice_run["matches"] == 10


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

    async def call(i: int, timeout: float):
        assert timeout == 2.0
        if i % 2:
            raise refused_call()
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
