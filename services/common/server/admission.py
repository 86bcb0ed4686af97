"""Admission control: a bounded queue in front of a service's model work, which refuses at once
what it could not serve within the caller's deadline.

Without it every call that arrives is handed to the model: at a multiple of the sustained rate the
calls share the cores, each takes longer, and most of them run out their deadline having used CPU
that a call which could have passed needed (throughput collapse). Here at most ``concurrency``
calls run the models at a time; up to ``max_queue`` more wait in FIFO order; a call is refused with
RESOURCE_EXHAUSTED, a reason and a retry hint (google.rpc.RetryInfo), in the time it takes to
look at the queue, when

- the queue is full (``QUEUE_FULL``), or
- the queue's expected wait plus the call's own expected service time exceeds the time left to its
  deadline (``DEADLINE_UNREACHABLE``): it would have missed the deadline anyway.

A call holds its slot from admission until its handler says its model work is over
(``context.done_with_models``: before the audit record's write, whose fsync waits rather than
computes) or until it ends. The expected service time is an exponentially weighted moving average per
RPC kind, measured under the slot (so it includes the contention of ``concurrency`` calls sharing the
cores); the
expected wait is the work ahead (what is left of the running calls' estimates plus the queued
calls' estimates) divided by ``concurrency``. A kind the queue has not yet measured counts
nothing, in its own call's budget and in the work ahead of others: borrowing another kind's time
refused, after eight voice Enrolls of ~12 s, the Verify calls beyond the free slots until the first
Verify (~4 s) ended, and a kind whose borrowed budget exceeds every deadline would never run to get a
sample of its own. Such a call queues, and leaves the queue as soon as its kind's first sample says it
can no longer finish; but counting nothing, a burst of it would all be taken, so until that sample at
most ``UNMEASURED_ROUNDS`` x ``concurrency`` calls of the kind run or queue (a round in the slots
and one to follow them) and the rest are refused (``QUEUE_FULL``). A call is admitted on the expected wait plus its own
average service time plus ``SPREAD`` mean deviations of the two together (the calls ahead's
deviations add as variances, and as their work is shared over ``concurrency`` slots its variance
is over ``concurrency`` squared; as TCP budgets a round trip, RFC 6298): a call admitted on averages
alone misses its deadline, or leaves the queue late, whenever the calls run slower than average. A queued call whose
deadline comes so close that it could no longer finish leaves the queue with the same refusal
(``DEADLINE_UNREACHABLE``) rather than start work nobody will read.

Which RPCs go through the queue is declared in the proto (``option (biogate.v1.model_work)``);
the others (GetEnrollment, DeleteSubject, challenges, health, reflection) never wait behind it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import grpc

from services.common import errors, metrics

QUEUE_FULL = "QUEUE_FULL"
DEADLINE_UNREACHABLE = "DEADLINE_UNREACHABLE"
MIN_RETRY_S = 0.01
SPREAD = 2.0  # mean deviations of service time a call's budget adds to the averages
UNMEASURED_ROUNDS = 2  # x concurrency: the calls of a kind without a sample that may run or queue


@dataclass(eq=False)
class Slot:
    """A call's place: queued until ``started`` is set, then holding one of the ``concurrency`` slots."""

    kind: str
    deadline: float | None
    started: float | None = None
    _released: bool = field(default=False, repr=False)
    # The queued call's own wake-up (on the queue's lock) and its client's cancellation test: a start
    # or a cancellation wakes the one call it concerns, not every queued thread to re-check and sleep.
    _wakeup: threading.Condition | None = field(default=None, repr=False)
    _cancelled: Callable[[], bool] | None = field(default=None, repr=False)


class AdmissionQueue:
    """One service's bounded queue. ``clock`` is the monotonic clock deadlines are given on."""

    def __init__(self, service: str, concurrency: int, max_queue: int, *, alpha: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if concurrency < 1 or max_queue < 0 or not 0 < alpha <= 1:
            raise ValueError("concurrency >= 1, max_queue >= 0 and 0 < alpha <= 1 are required")
        self.service = service
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.alpha = alpha
        self.clock = clock
        self._lock = threading.Lock()
        self._running: list[Slot] = []
        self._queued: deque[Slot] = deque()
        self._estimate_s: dict[str, float] = {}
        self._deviation_s: dict[str, float] = {}
        self.last_activity = clock()  # when a call last arrived or finished (the memory trimmer's idle clock)
        self.completed = 0

    # --- estimates ------------------------------------------------------------------------

    def estimate(self, kind: str) -> float:
        """Expected service time of ``kind``; 0 before its first sample (unknown: not held against it)."""
        with self._lock:
            return self._estimate(kind)

    def _estimate(self, kind: str) -> float:
        return self._estimate_s.get(kind, 0.0)

    def budget(self, kind: str) -> float:
        """The service time a call of ``kind`` is admitted on: the average plus SPREAD mean deviations."""
        with self._lock:
            return self._budget(kind)

    def _budget(self, kind: str) -> float:
        return self._estimate(kind) + SPREAD * self._deviation(kind)

    def _deviation(self, kind: str) -> float:
        return self._deviation_s.get(kind, 0.0)

    def finish_time(self, kind: str) -> float:
        """Seconds in which a call of ``kind`` arriving now is budgeted to be answered."""
        with self._lock:
            return self._finish_time(kind, self.clock())

    def _finish_time(self, kind: str, now: float) -> float:
        wait = self._expected_wait(now)
        spread_sq = self._deviation(kind) ** 2
        if wait > 0:
            ahead = [*self._running, *self._queued]
            spread_sq += sum(self._deviation(s.kind) ** 2 for s in ahead) / self.concurrency ** 2
        return wait + self._estimate(kind) + SPREAD * math.sqrt(spread_sq)

    def observe(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._observe(kind, seconds)

    def _observe(self, kind: str, seconds: float) -> None:
        old = self._estimate_s.get(kind)
        if old is None:
            self._estimate_s[kind], self._deviation_s[kind] = seconds, 0.0
            # Its queued calls sleep till their deadline (nothing was budgeted): now they can judge.
            for slot in self._queued:
                if slot.kind == kind and slot.deadline is not None and slot._wakeup is not None:
                    slot._wakeup.notify()
            return
        dev = self._deviation_s[kind]
        self._deviation_s[kind] = dev + self.alpha * (abs(seconds - old) - dev)
        self._estimate_s[kind] = old + self.alpha * (seconds - old)

    def expected_wait(self) -> float:
        """Seconds a call arriving now would wait for a slot."""
        with self._lock:
            return self._expected_wait(self.clock())

    def _expected_wait(self, now: float) -> float:
        if len(self._running) < self.concurrency and not self._queued:
            return 0.0
        ahead = sum(max(self._estimate(s.kind) - (now - (s.started or now)), 0.0) for s in self._running)
        ahead += sum(self._estimate(s.kind) for s in self._queued)
        return ahead / self.concurrency

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def running(self) -> int:
        return len(self._running)

    # --- admission ------------------------------------------------------------------------

    def acquire(self, kind: str, deadline: float | None, cancelled: Callable[[], bool] | None = None) -> Slot:
        """Waits for a slot and returns it (hand it to :meth:`release`), or raises the refusal.

        ``deadline`` is the monotonic time by which the call must be answered; None: no bound.
        ``cancelled`` is asked at every wake-up (see :meth:`wake`): a call whose client gave up leaves
        the queue with CANCELLED instead of taking a slot later."""
        with self._lock:
            now = self.clock()
            self.last_activity = now
            slot = Slot(kind, deadline, _wakeup=threading.Condition(self._lock), _cancelled=cancelled)
            wait = self._expected_wait(now)
            finish = self._finish_time(kind, now)
            own = finish - wait
            if deadline is not None and now + finish > deadline:
                raise self._refuse(slot, DEADLINE_UNREACHABLE, wait, own, deadline - now)
            busy = len(self._running) >= self.concurrency or bool(self._queued)
            if busy and len(self._queued) >= self.max_queue:
                raise self._refuse(slot, QUEUE_FULL, wait, own, None if deadline is None else deadline - now)
            if kind not in self._estimate_s:
                mine = [s for s in (*self._running, *self._queued) if s.kind == kind]
                if len(mine) >= UNMEASURED_ROUNDS * self.concurrency:
                    # No sample to go on: its oldest call has run this long without ending, as long again.
                    ran = max((now - s.started for s in mine if s.started is not None), default=0.0)
                    raise self._refuse(slot, QUEUE_FULL, wait, own, None if deadline is None else deadline - now,
                                       unmeasured=len(mine), retry=ran)
            self._queued.append(slot)
            metrics.ADMISSION_QUEUED.labels(self.service).set(len(self._queued))
            while True:
                self._start_heads(self.clock())
                if slot.started is not None:
                    return slot
                if cancelled is not None and cancelled():
                    self._queued.remove(slot)
                    metrics.ADMISSION_QUEUED.labels(self.service).set(len(self._queued))
                    raise errors.ServiceError(grpc.StatusCode.CANCELLED,
                                              "the client cancelled the call while it was queued")
                # Woken when started or cancelled; the deadline check needs a wake-up of its own.
                timeout = None if deadline is None else max(deadline - self._budget(kind) - self.clock(), 0.0)
                if timeout == 0.0 or not slot._wakeup.wait(timeout):  # type: ignore[union-attr]
                    now = self.clock()
                    if slot.started is None and deadline is not None and now + self._budget(kind) >= deadline:
                        self._queued.remove(slot)
                        metrics.ADMISSION_QUEUED.labels(self.service).set(len(self._queued))
                        raise self._refuse(slot, DEADLINE_UNREACHABLE, self._expected_wait(now),
                                           self._budget(kind), deadline - now)

    def wake(self) -> None:
        """Wakes the queued calls whose clients cancelled them, to leave the queue (a call's end runs it)."""
        with self._lock:
            for slot in self._queued:
                if slot._cancelled is not None and slot._wakeup is not None and slot._cancelled():
                    slot._wakeup.notify()

    def _start_heads(self, now: float) -> None:
        """Moves queued calls into free slots, in order of arrival (under the lock)."""
        started = False
        while self._queued and len(self._running) < self.concurrency:
            head = self._queued.popleft()
            head.started = now
            self._running.append(head)
            if head._wakeup is not None:
                head._wakeup.notify()
            started = True
        if started:
            metrics.ADMISSION_QUEUED.labels(self.service).set(len(self._queued))

    def release(self, slot: Slot, *, observe: bool = True) -> None:
        """Frees the slot; its service time feeds the kind's estimate unless ``observe`` is False."""
        with self._lock:
            if slot._released or slot.started is None:
                return
            slot._released = True
            self._running.remove(slot)
            self.completed += 1
            self.last_activity = self.clock()
            if observe:
                self._observe(slot.kind, self.clock() - slot.started)
            self._start_heads(self.clock())

    def _refuse(self, slot: Slot, reason: str, wait: float, own: float, left: float | None, *,
                unmeasured: int = 0, retry: float = 0.0) -> errors.ServiceError:
        metrics.RPC_SHED.labels(self.service, slot.kind, reason).inc()
        retry = max(wait, own, retry, MIN_RETRY_S)
        if unmeasured:
            message = (f"the {self.service} service has {unmeasured} {slot.kind} calls running or queued and no "
                       f"measure of their time yet: retry after {retry:.2f} s, when the first has ended")
        elif reason == QUEUE_FULL:
            message = (f"the {self.service} service is at capacity ({self.concurrency} running, "
                       f"{len(self._queued)} queued): retry after {retry:.2f} s, or spread the load")
        else:
            message = (f"the {self.service} service would answer in about {wait + own:.2f} s, after the call's "
                       f"deadline ({max(left or 0.0, 0.0):.2f} s left): retry after {retry:.2f} s, or now with a "
                       f"deadline over {wait + own:.2f} s")
        return errors.ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason, retry_delay_s=round(retry, 3),
            metadata={"expected_wait_ms": str(round(wait * 1000)), "service_ms": str(round(own * 1000)),
                      "queued": str(len(self._queued)), "concurrency": str(self.concurrency)})

