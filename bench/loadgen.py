"""A bounded, self-stopping gRPC load generator for loopback benchmarks.

    from bench.loadgen import run_load
    result = asyncio.run(run_load(call, concurrency=8, duration_s=20, max_requests=2000))
    print(result.summary())

``call`` is an async function making one request (e.g. ``lambda: stub.Verify(req)`` on a
``grpc.aio`` channel). The run stops at whichever comes first of ``duration_s`` and
``max_requests`` answered calls, so it can never run away; a failed call is counted and its status
recorded, not retried, and a call refused at once (RESOURCE_EXHAUSTED) is counted apart, by reason
(:class:`RequestBudget`). Only loopback targets are allowed (the benchmarks never load anything but
this machine).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc
import numpy as np

from bench.harness import pct


def assert_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"benchmarks only target loopback addresses, not {target}")


class RequestBudget:
    """A closed loop's budget: ``max_requests`` answered calls within ``duration_s``. A call refused at
    once (RESOURCE_EXHAUSTED: admission, a rate limit) gives its place back and is counted apart, by
    reason: counted as a request, a loop that re-sends refusals at once spent its budget on them and
    ended early (bench/RESULTS.md, issue 13: 172 refusals and 22 answers in a level of 200)."""

    def __init__(self, max_requests: int, duration_s: float, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.max_requests, self.clock, self.sleep = max_requests, clock, sleep
        self.stop_at = clock() + duration_s
        self.answered = self.in_flight = 0
        self.refused: Counter = Counter()

    def take(self) -> bool:
        """A place for the next call, or False when the time is up or the answers due are all sent for."""
        if self.clock() >= self.stop_at or self.answered + self.in_flight >= self.max_requests:
            return False
        self.in_flight += 1
        return True

    def done(self, err: grpc.aio.AioRpcError | None = None) -> bool:
        """The call took ended (``err`` None: answered); True when it was refused, so not an answer."""
        from services.common.errors import details_of

        self.in_flight -= 1
        if err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.refused[details_of(err).get("reason") or "RESOURCE_EXHAUSTED"] += 1
            return True
        self.answered += 1
        return False

    async def back_off(self, err: grpc.aio.AioRpcError) -> None:
        """Waits out a refusal's retry hint (google.rpc.RetryInfo), as a client that honours it does, at
        most until the time is up: re-sent at once, a refused call only adds to the load that refused it."""
        from services.common.errors import details_of

        delay = details_of(err).get("retry_delay_s") or 0.0
        await self.sleep(max(0.0, min(delay, self.stop_at - self.clock())))


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # answered with another status, by code
    not_matched: int = 0  # answered OK with a "no match" decision: in latencies_s, not an error
    refused: Counter = field(default_factory=Counter)  # RESOURCE_EXHAUSTED, by reason: not requests
    wall_s: float = 0.0
    concurrency: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict:
        return {
            "requests_ok": self.ok,
            "errors": dict(self.errors),
            "not_matched": self.not_matched,
            "refused": dict(self.refused),
            "concurrency": self.concurrency,
            "wall_s": round(self.wall_s, 3),
            "throughput_per_s": round(self.throughput, 2),
            "p50_ms": round(self.percentile(50) * 1000, 2),
            "p95_ms": round(self.percentile(95) * 1000, 2),
            "p99_ms": round(self.percentile(99) * 1000, 2),
        }

    def summary(self) -> str:
        d = self.as_dict()
        return (f"{d['requests_ok']} ok, {sum(self.errors.values())} errors, {sum(self.refused.values())} refused, "
                f"c={self.concurrency}: "
                f"{d['throughput_per_s']}/s, p50 {d['p50_ms']} ms, p95 {d['p95_ms']} ms, p99 {d['p99_ms']} ms")


async def run_load(
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    warmup_requests: int = 0,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> LoadResult:
    """Runs ``call`` from ``concurrency`` workers until the time or request budget (answered calls) is spent."""
    if concurrency < 1 or duration_s <= 0 or max_requests < 1:
        raise ValueError("concurrency, duration_s and max_requests must be positive")
    for _ in range(warmup_requests):
        await call()
    budget = RequestBudget(max_requests, duration_s, sleep=sleep)
    result = LoadResult(concurrency=concurrency, refused=budget.refused)

    async def worker() -> None:
        while budget.take():
            start = time.perf_counter()
            try:
                await call()
            except grpc.aio.AioRpcError as err:
                if budget.done(err):
                    await budget.back_off(err)
                else:
                    result.errors[err.code().name] += 1
                continue
            budget.done()
            result.latencies_s.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    return result


def aio_channel(target: str, token: str | None, max_message_bytes: int = 16 * 1024 * 1024) -> grpc.aio.Channel:
    """An asyncio channel to a loopback target, sending the bearer token with every call."""
    assert_loopback(target)

    class _Auth(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(_with_token(details), request)

        async def intercept_stream_unary(self, continuation, details, request_iterator):
            return await continuation(_with_token(details), request_iterator)

    def _with_token(details):
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if token:
            metadata.add("authorization", f"Bearer {token}")
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
    return grpc.aio.insecure_channel(target, options=options, interceptors=[_Auth()])


@dataclass
class Outcome:
    """One call of an open-loop run: when it was issued (s from the start), how long it took, and how it ended."""

    issued_s: float
    latency_s: float
    code: str  # grpc.StatusCode name
    reason: str = ""
    retry_delay_s: float | None = None


@dataclass
class OpenLoopResult:
    rate_per_s: float
    duration_s: float
    deadline_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    def passed(self) -> list[Outcome]:
        """Calls answered OK within their deadline."""
        return [o for o in self.outcomes if o.code == "OK" and o.latency_s <= self.deadline_s]

    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code == "RESOURCE_EXHAUSTED"]

    def passed_rate(self) -> float:
        """Calls per second that passed within their deadline, over the issuing window."""
        return len(self.passed()) / self.duration_s

    def tail_ratio(self) -> float:
        """p99 / p50 of the calls that passed: issue 13's "p99 <= 3 x p50" at a fixed arrival rate."""
        latencies = [o.latency_s for o in self.passed()]
        return pct(latencies, 99) / pct(latencies, 50) if latencies else float("nan")

    def as_dict(self) -> dict:
        passed, refused = self.passed(), self.refused()
        codes = Counter(o.code for o in self.outcomes)
        return {
            "offered_per_s": round(self.rate_per_s, 2), "duration_s": self.duration_s, "deadline_s": self.deadline_s,
            "issued": len(self.outcomes), "codes": dict(codes),
            "reasons": dict(Counter(o.reason for o in refused)),
            "passed_per_s": round(self.passed_rate(), 2),
            "passed_p50_ms": round(pct([o.latency_s for o in passed], 50), 1),
            "passed_p99_ms": round(pct([o.latency_s for o in passed], 99), 1),
            "passed_p99_over_p50": round(self.tail_ratio(), 2),
            "refused_p50_ms": round(pct([o.latency_s for o in refused], 50), 1),
            "refused_p99_ms": round(pct([o.latency_s for o in refused], 99), 1),
            "refused_with_retry_hint": sum(1 for o in refused if o.retry_delay_s is not None),
            "refused_p99_ms_by_reason": {r: round(pct([o.latency_s for o in refused if o.reason == r], 99), 1)
                                         for r in sorted({o.reason for o in refused})},
        }


async def run_open_loop(
    call: Callable[[int, float], Awaitable[object]],
    *,
    rate_per_s: float,
    duration_s: float,
    deadline_s: float,
    max_requests: int,
) -> OpenLoopResult:
    """Issues ``call(i, timeout)`` at a fixed rate, whatever the answers (an open loop: arrivals do
    not wait for answers, as a bank's traffic does not), for ``duration_s`` or ``max_requests``
    calls, each with the deadline ``deadline_s``; returns when every call has ended."""
    from services.common.errors import details_of

    if rate_per_s <= 0 or duration_s <= 0 or deadline_s <= 0 or max_requests < 1:
        raise ValueError("rate_per_s, duration_s, deadline_s and max_requests must be positive")
    result = OpenLoopResult(rate_per_s, duration_s, deadline_s)
    start = time.perf_counter()

    async def one(i: int, issued: float) -> None:
        try:
            await call(i, deadline_s)
        except grpc.aio.AioRpcError as err:
            details = details_of(err) if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED else {}
            result.outcomes.append(Outcome(issued, time.perf_counter() - start - issued, err.code().name,
                                           details.get("reason", ""), details.get("retry_delay_s")))
            return
        result.outcomes.append(Outcome(issued, time.perf_counter() - start - issued, "OK"))

    tasks = []
    n = min(max_requests, int(rate_per_s * duration_s))
    for i in range(n):
        due = i / rate_per_s
        delay = due - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, time.perf_counter() - start)))
    await asyncio.gather(*tasks)
    return result


# Issue 13: the tail is judged at this share of the throughput that the highest closed-loop level reached.
OPEN_LOOP_SHARE = 0.8


async def open_loop_at_share(
    call: Callable[[int, float], Awaitable[object]],
    closed_loop_rate: float,
    *,
    duration_s: float,
    deadline_s: float,
    share: float = OPEN_LOOP_SHARE,
) -> OpenLoopResult:
    """:func:`run_open_loop` at ``share`` x ``closed_loop_rate`` requests per second (arrivals at
    fixed intervals, whatever the answers), for ``duration_s``: the latency a service gives below
    its saturation, where a closed loop's latency is only its own queue (Little's law)."""
    if closed_loop_rate <= 0 or not 0 < share <= 1:
        raise ValueError("closed_loop_rate must be positive and share in (0, 1]")
    rate = share * closed_loop_rate
    return await run_open_loop(call, rate_per_s=rate, duration_s=duration_s, deadline_s=deadline_s,
                               max_requests=max(1, math.ceil(rate * duration_s)))


def open_loop_line(result: OpenLoopResult) -> str:
    d = result.as_dict()
    return (f"open loop at {d['offered_per_s']}/s for {d['duration_s']:g} s: {d['issued']} issued, codes {d['codes']}, "
            f"{d['passed_per_s']}/s within {d['deadline_s']:g} s, p50 {d['passed_p50_ms']} ms, "
            f"p99 {d['passed_p99_ms']} ms, p99/p50 {d['passed_p99_over_p50']}")
