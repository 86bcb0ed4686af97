"""Micro-batching across concurrent requests, for the thread pool of gRPC's sync server.

Callers block in :meth:`MicroBatcher.submit`; one worker thread gathers the queued items into a
batch (at most ``max_batch``, waiting at most ``max_wait_ms`` after the first item for more) and
calls ``fn`` once per batch. Shared by the face and voice services.

A caller waits no longer than its RPC's deadline (``services.common.context.deadline``, when it runs
inside one) nor its own ``timeout``: past that, its items that have not started are withdrawn (the
worker skips them) and it gets DEADLINE_EXCEEDED, MODEL_QUEUE_DEADLINE, instead of holding its thread
while a model's queue drains work nobody waits for. :class:`Inline` starts no model run past the
deadline either.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Generic, Sequence, TypeVar

import grpc

from services.common import context, errors, metrics

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)
_STOP = object()


class BatcherClosed(RuntimeError):
    pass


def _too_late(name: str) -> errors.ServiceError:
    return errors.ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"{name}: the call's deadline passed before its model work was done; retry later or with a longer deadline",
        "MODEL_QUEUE_DEADLINE")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 4096,
        name: str = "micro-batcher",
        model: str | None = None,  # the label of its batch-size and inference-time metrics; default name
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._fn = fn
        self._batch_size = metrics.BATCH_SIZE.labels(model or name)
        self._inference = metrics.INFERENCE_SECONDS.labels(model or name)
        self.name = name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0  # counters, for metrics and tests
        self.items = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit_async(self, item: T) -> Future:
        with self._lock:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            fut: Future = Future()
            self._queue.put((item, fut))
        return fut

    def submit(self, item: T, timeout: float | None = None) -> R:
        return self.submit_many([item], timeout)[0]

    def submit_many(self, items: Sequence[T], timeout: float | None = None) -> list[R]:
        """The items' results, waiting at most ``timeout`` seconds in all and never past the current
        RPC's deadline (ServiceError DEADLINE_EXCEEDED; the items not started are withdrawn)."""
        now = time.monotonic()
        ends = [end for end in (None if timeout is None else now + timeout, context.deadline.get()) if end is not None]
        end = min(ends) if ends else None
        futures = [self.submit_async(i) for i in items]
        try:
            return [f.result(None if end is None else max(0.0, end - time.monotonic())) for f in futures]
        except FutureTimeout:
            for f in futures:
                f.cancel()
            raise _too_late(self.name) from None

    def close(self, timeout: float | None = 5.0) -> None:
        """Finish the queued items, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put((_STOP, None))
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item[0] is _STOP:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt[0] is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._execute(batch)

    def _execute(self, batch: list[tuple[T, Future]]) -> None:
        live = [(i, f) for i, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        self._batch_size.observe(len(live))
        started = time.perf_counter()
        try:
            results = self._fn([i for i, _ in live])
            self._inference.observe(time.perf_counter() - started)
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
        except BaseException as exc:  # every waiting caller gets the error, the worker lives on
            log.exception("micro-batch failed", extra={"batch_size": len(live)})
            for _, f in live:
                f.set_exception(exc)
            return
        self.batches += 1
        self.items += len(live)
        for (_, f), r in zip(live, results, strict=True):
            f.set_result(r)


class RunLimit:
    """At most ``limit`` model runs at a time among the :class:`Inline` runners sharing it (None: no
    bound; the admitted calls are then the only bound). A memory bound: on the CPU each run holds its
    activations while it lasts (AASIST ~170 MB a window), and a process admits as many calls as it has
    cores. Bounded, the runs go to ``limit`` threads of its own rather than the callers' threads: a
    thread that has run a model keeps what torch and glibc hold per thread (arenas, kernel scratch
    space), so runs spread over many request threads cost memory with each new thread even at a few
    at a time (bench/RESULTS.md, "Voice memory against admitted calls"). A call beyond the bound waits
    for a run to end (it is admitted already, and is not refused), but none is started past its RPC's
    deadline (DEADLINE_EXCEEDED, MODEL_QUEUE_DEADLINE); a run started is not pre-empted."""

    def __init__(self, limit: int | None, name: str) -> None:
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1 or None")
        self.limit = limit
        self._pool = None if limit is None else ThreadPoolExecutor(limit, thread_name_prefix=f"{name}-model")
        self._waiting = metrics.MODEL_RUNS_WAITING.labels(name)
        self._lock = threading.Lock()
        self.running = 0
        self.most_running = 0  # the most runs seen at once, for tests and benches
        self.waiting = 0

    def _count(self, running: int = 0, waiting: int = 0) -> None:
        with self._lock:
            self.running += running
            self.most_running = max(self.most_running, self.running)
            self.waiting += waiting
        if waiting:
            self._waiting.inc(waiting)

    def _run(self, fn: Callable[[list[T]], Sequence[R]], chunk: list[T]) -> Sequence[R]:
        self._count(running=1)
        try:
            return fn(chunk)
        finally:
            self._count(running=-1)

    def _start(self, ctx: contextvars.Context, fn: Callable[[list[T]], Sequence[R]], chunk: list[T]) -> Sequence[R]:
        self._count(waiting=-1)
        return ctx.run(self._run, fn, chunk)

    def call(self, caller: str, fn: Callable[[list[T]], Sequence[R]], chunk: list[T]) -> Sequence[R]:
        """``fn(chunk)``: here without a bound, else on one of the bound's threads."""
        if self._pool is None:
            return self._run(fn, chunk)
        self._count(waiting=1)
        try:
            fut = self._pool.submit(self._start, contextvars.copy_context(), fn, chunk)
        except RuntimeError:  # shut down
            self._count(waiting=-1)
            raise BatcherClosed("the model runs' bound is closed") from None
        deadline = context.deadline.get()
        try:
            return fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            if fut.cancel():
                self._count(waiting=-1)
                raise _too_late(caller) from None
            return fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class Inline(Generic[T, R]):
    """A :class:`MicroBatcher`'s interface, calling ``fn`` on the caller's thread (or, under a bounded
    :class:`RunLimit`, one of its threads): on a CPU a batch costs about the items' time one by one,
    while the batcher's one thread holds a model to one core and hands every item between threads;
    inline, concurrent callers (as many as the admission slots, i.e. the cores, or the bound) run the
    model side by side, each item in the chunks its caller sent."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int = 32, name: str = "inline",
                 model: str | None = None, limit: RunLimit | None = None) -> None:
        self._fn = fn
        self._limit = limit or RunLimit(None, model or name)
        self._in_flight = metrics.MODEL_RUNS_IN_FLIGHT.labels(model or name)
        self._batch_size = metrics.BATCH_SIZE.labels(model or name)
        self._inference = metrics.INFERENCE_SECONDS.labels(model or name)
        self.name = name
        self.max_batch = max_batch
        self._count_lock = threading.Lock()
        self.batches = 0
        self.items = 0

    def _timed(self, chunk: list[T]) -> Sequence[R]:
        with self._in_flight.track_inprogress():
            started = time.perf_counter()
            results = self._fn(chunk)
            self._inference.observe(time.perf_counter() - started)
        return results

    def submit_async(self, item: T) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(self.submit(item))
        except Exception as exc:  # raised where the result is read, as from a batcher
            fut.set_exception(exc)
        return fut

    def submit(self, item: T, timeout: float | None = None) -> R:
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[T], timeout: float | None = None) -> list[R]:
        """Runs ``fn`` here, chunk by chunk, each within the shared :class:`RunLimit`. A chunk running
        cannot be pre-empted (``timeout`` is not applied), but none is started once the current RPC's
        deadline has passed (DEADLINE_EXCEEDED): its client has gone, and the core is better spent on
        a call that still waits."""
        out: list[R] = []
        deadline = context.deadline.get()
        for i in range(0, len(items), self.max_batch):
            if deadline is not None and time.monotonic() >= deadline:
                raise _too_late(self.name)
            chunk = list(items[i : i + self.max_batch])
            results = self._limit.call(self.name, self._timed, chunk)
            self._batch_size.observe(len(chunk))
            if len(results) != len(chunk):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(chunk)} items")
            out.extend(results)
            with self._count_lock:
                self.batches += 1
                self.items += len(chunk)
        return out

    def close(self, timeout: float | None = 5.0) -> None:
        pass
