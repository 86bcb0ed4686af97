"""The admission queue's decisions (services/common/server/admission.py), on an injected clock:
what it admits, queues and refuses, the estimates it refuses on, and the refusal clients see."""

from __future__ import annotations

import math
import threading

import grpc
import pytest
from pydantic import ValidationError

from services.common.config import ServerConfig
from services.common.errors import ServiceError
from services.common.server.admission import DEADLINE_UNREACHABLE, QUEUE_FULL, AdmissionQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def queue(concurrency: int = 2, max_queue: int = 3, alpha: float = 0.5) -> tuple[AdmissionQueue, Clock]:
    clock = Clock()
    return AdmissionQueue("test", concurrency, max_queue, alpha=alpha, clock=clock), clock


def refusal(q: AdmissionQueue, kind: str, deadline: float | None):
    with pytest.raises(Exception) as err:
        q.acquire(kind, deadline)
    return err.value


def test_free_slots_admit_at_once_and_the_service_time_feeds_the_estimate():
    q, clock = queue()
    a = q.acquire("Verify", None)
    b = q.acquire("Verify", None)
    assert (a.started, b.started, q.running, q.queued) == (100.0, 100.0, 2, 0)
    clock.now += 0.4
    q.release(a)
    assert q.estimate("Verify") == pytest.approx(0.4)
    clock.now += 0.4  # b took 0.8 s: the average moves halfway (alpha 0.5)
    q.release(b)
    assert q.estimate("Verify") == pytest.approx(0.6)
    q.release(b)  # a second release is a no-op
    assert q.running == 0 and q.estimate("Verify") == pytest.approx(0.6)


def test_a_call_is_admitted_on_the_average_plus_two_mean_deviations():
    q, _ = queue(alpha=0.5)
    q.observe("Verify", 1.0)
    assert q.budget("Verify") == pytest.approx(1.0)  # one sample: no spread known yet
    q.observe("Verify", 2.0)  # mean 1.5, mean deviation 0.5
    assert (q.estimate("Verify"), q.budget("Verify")) == (pytest.approx(1.5), pytest.approx(2.5))
    assert q.budget("Identify") == 0.0  # no samples: unknown, not another kind's


def test_the_spread_of_the_calls_ahead_and_of_the_call_itself_is_budgeted_too():
    q, clock = queue(concurrency=1, max_queue=5, alpha=0.5)
    q.observe("Verify", 1.0)
    q.observe("Verify", 2.0)  # mean 1.5, mean deviation 0.5
    assert q.finish_time("Verify") == pytest.approx(1.5 + 2 * 0.5)  # a free slot: its own spread only
    running = q.acquire("Verify", None)
    # 1.5 s ahead + 1.5 s of its own, and 2 x sqrt(0.5^2 + 0.5^2) of spread: 4.41 s
    assert q.finish_time("Verify") == pytest.approx(3.0 + 2 * math.sqrt(0.5))
    assert refusal(q, "Verify", clock.now + 4.3).reason == DEADLINE_UNREACHABLE  # the averages alone fit (3.0)
    t, out = queued_in_thread(q, "Verify", clock.now + 4.5)
    wait_until(lambda: q.queued == 1, "the call queued")
    q.release(running)
    t.join(10)
    assert out[0].started is not None


def test_the_spread_of_the_work_ahead_is_shared_over_the_slots_as_its_average_is():
    """The wait is the work ahead over ``concurrency`` slots, so its variance is the calls ahead's
    variances over concurrency squared (Var(S/c) = Var(S)/c^2), not over concurrency."""
    q, clock = queue(concurrency=2, max_queue=5, alpha=0.5)
    q.observe("Verify", 1.0)
    q.observe("Verify", 2.0)  # mean 1.5, mean deviation 0.5
    running = [q.acquire("Verify", None) for _ in range(2)]
    # 3.0 s ahead over 2 slots + 1.5 s of its own, and 2 x sqrt(0.5^2 + 2 x 0.5^2 / 2^2) of spread:
    # 4.22 s (4.41 s with the variances over 2)
    assert q.finish_time("Verify") == pytest.approx(3.0 + 2 * math.sqrt(0.25 + 0.5 / 4))
    t, out = queued_in_thread(q, "Verify", clock.now + 4.3)
    wait_until(lambda: q.queued == 1 or bool(out), "the call queued or refused")
    assert not out, out[0]
    q.release(running[0])
    t.join(10)
    assert out[0].started is not None


def test_a_kind_without_samples_counts_nothing_in_the_work_ahead():
    q, _ = queue(concurrency=1)
    q.observe("Verify", 0.2)
    q.observe("Enroll", 0.9)
    assert q.estimate("Identify") == 0.0
    q.acquire("Identify", None)
    assert q.expected_wait() == 0.0 and q.finish_time("Verify") == pytest.approx(0.2)


def test_a_kind_without_samples_is_not_refused_on_another_kinds_service_time():
    """bench/RESULTS.md "Voice with the digit challenge on", run 2: eight Enrolls (~12 s each under
    load) and then Verify (~4 s): until the first Verify ended, the Verify calls beyond the free slots
    were budgeted at Enroll's time and refused DEADLINE_UNREACHABLE (195 of 200 in a rerun) though each
    was answered in under 9 s."""
    q, clock = queue(concurrency=2, max_queue=8, alpha=0.2)
    for seconds in (12.7, 12.1, 11.3, 12.5, 13.4, 13.9, 12.2, 8.9):  # that rerun's Enrolls
        q.observe("Enroll", seconds)
    assert (q.estimate("Enroll"), q.budget("Enroll")) == (pytest.approx(11.9, abs=0.05), pytest.approx(14.5, abs=0.05))
    q.acquire("Verify", None)
    q.acquire("Verify", None)
    t, out = queued_in_thread(q, "Verify", None)
    wait_until(lambda: q.queued == 1, "the third call queued")
    clock.now += 3.0
    t2, out2 = queued_in_thread(q, "Verify", clock.now + 30.0)  # the server's rpc_timeout_s
    wait_until(lambda: q.queued == 2 or bool(out2), "the fourth call queued or refused")
    assert not out2 or not isinstance(out2[0], ServiceError), out2[0]


def test_a_kind_without_samples_is_admitted_on_an_idle_queue_whatever_the_other_kinds_take():
    """Refused on a borrowed estimate, a kind never runs, so never gets a sample of its own: refused forever."""
    q, clock = queue(concurrency=2, max_queue=8)
    q.observe("Enroll", 40.0)
    slot = q.acquire("Verify", clock.now + 30.0)
    assert slot.started == clock.now


def test_a_burst_of_a_kind_without_samples_is_bounded_till_its_first_sample():
    """Counting nothing, every call of a never-measured kind would be taken while the queue has room:
    two rounds of the slots run or queue, the rest are refused as a full queue is, with a retry hint."""
    q, clock = queue(concurrency=2, max_queue=8)
    running = [q.acquire("Identify", None) for _ in range(2)]
    waiting = [queued_in_thread(q, "Identify", None) for _ in range(2)]
    wait_until(lambda: q.queued == 2, "two calls queued")
    clock.now += 3.0
    burst = [queued_in_thread(q, "Identify", clock.now + 60.0) for _ in range(3)]
    wait_until(lambda: all(out for _, out in burst), "the burst answered")
    for _, (err,) in burst:
        assert isinstance(err, ServiceError), err
        assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_FULL)
        assert err.retry_delay_s == pytest.approx(3.0)  # its oldest call has run 3 s and not ended
        assert "Identify calls running or queued and no measure" in err.message
    assert (q.running, q.queued) == (2, 2)  # nothing was queued for them
    q.observe("Verify", 0.5)
    more = queued_in_thread(q, "Verify", None)  # a measured kind still queues behind them
    wait_until(lambda: q.queued == 3, "the Verify call queued")
    q.release(running[0])  # the first sample: 3 s
    waiting[0][0].join(10)
    later = [queued_in_thread(q, "Identify", None) for _ in range(2)]
    wait_until(lambda: q.queued == 4, "the Identify calls queued once measured")
    assert all(not out for _, out in later) and not more[1]


def test_a_queued_call_leaves_as_soon_as_its_kinds_first_sample_says_it_cannot_finish():
    q, clock = queue(concurrency=2, max_queue=3)
    running = [q.acquire("Verify", None) for _ in range(2)]
    t1, out1 = queued_in_thread(q, "Verify", None)
    wait_until(lambda: q.queued == 1, "the first call queued")
    t2, out2 = queued_in_thread(q, "Verify", clock.now + 1000.0)
    wait_until(lambda: q.queued == 2, "the second call queued")
    clock.now += 600.0  # the first sample: 600 s; the second queued call could no longer finish
    q.release(running[0])
    t2.join(10)  # not its real-time wake-up, 400 s on
    assert out2 and getattr(out2[0], "reason", None) == DEADLINE_UNREACHABLE and q.queued == 0
    t1.join(10)
    assert out1[0].started is not None


def test_the_expected_wait_is_the_work_ahead_over_the_slots():
    q, clock = queue(concurrency=2, max_queue=4)
    q.observe("Verify", 1.0)
    q.acquire("Verify", None)
    assert q.expected_wait() == 0.0  # a slot is free
    q.acquire("Verify", None)
    clock.now += 0.25  # both running calls have 0.75 s left
    assert q.expected_wait() == pytest.approx(0.75)
    clock.now += 5.0  # over their estimate: nothing is counted left, never a negative wait
    assert q.expected_wait() == 0.0


def queued_in_thread(q: AdmissionQueue, kind: str, deadline: float | None) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(q.acquire(kind, deadline))
        except Exception as exc:  # collected for the assertions
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def wait_until(predicate, what: str) -> None:
    done = threading.Event()
    for _ in range(2000):
        if predicate():
            return
        done.wait(0.005)
    raise AssertionError(f"never happened: {what}")


class Looks:
    """A queued call's cancellation test that counts how often its own thread woke to ask it (the
    queue's ``wake`` asks it too, from the thread that ends a call)."""

    def __init__(self) -> None:
        self.n = 0
        self.cancelled = False
        self.thread: threading.Thread | None = None

    def __call__(self) -> bool:
        if threading.current_thread() is self.thread:
            self.n += 1
        return self.cancelled


def queued_looking(q: AdmissionQueue, looks: Looks) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(q.acquire("Verify", None, cancelled=looks))
        except Exception as exc:  # collected for the assertions
            out.append(exc)

    t = looks.thread = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_release_wakes_the_call_it_starts_and_no_other_queued_thread():
    """Every queued thread woken by every release takes the GIL to look and sleep again: one process with
    8 calls in flight on 2 slots switched threads 118 times per call (bench/RESULTS.md "OpenCV's thread
    pool")."""
    q, _ = queue(concurrency=1, max_queue=5)
    q.observe("Verify", 0.1)  # measured: more than two calls of it may wait
    running = q.acquire("Verify", None)
    looks = [Looks() for _ in range(4)]
    calls = []
    for k, look in enumerate(looks):
        calls.append(queued_looking(q, look))
        wait_until(lambda k=k: q.queued == k + 1, "the call queued")  # in this order
    for t, out in calls:
        q.release(running)
        t.join(10)
        running = out[0]
        assert running.started is not None
    q.release(running)
    assert [look.n for look in looks] == [1, 1, 1, 1]  # asked once, on queueing; never woken before its start


def test_a_cancelled_queued_call_is_woken_to_leave_and_the_others_sleep_on():
    q, _ = queue(concurrency=1, max_queue=5)
    q.observe("Verify", 0.1)  # measured: more than two calls of it may wait
    running = q.acquire("Verify", None)
    gone, stays = Looks(), Looks()
    t1, out1 = queued_looking(q, gone)
    t2, out2 = queued_looking(q, stays)
    wait_until(lambda: q.queued == 2, "both calls queued")
    q.wake()  # a call ended (its callback): nobody cancelled, nobody leaves
    gone.cancelled = True
    q.wake()
    t1.join(10)
    assert isinstance(out1[0], ServiceError) and out1[0].code == grpc.StatusCode.CANCELLED and q.queued == 1
    q.release(running)
    t2.join(10)
    assert out2[0].started is not None
    assert (gone.n, stays.n) == (2, 1)  # the cancelled call looked when woken; the other was never woken


def test_a_call_the_queue_cannot_serve_before_its_deadline_is_refused_at_once_with_a_retry_hint():
    q, clock = queue(concurrency=1, max_queue=5)
    q.observe("Verify", 1.0)
    running = q.acquire("Verify", None)
    clock.now += 0.5  # 0.5 s of work left ahead; the call itself takes 1.0 s
    err = refusal(q, "Verify", deadline=clock.now + 1.4)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == DEADLINE_UNREACHABLE
    assert err.retry_delay_s == pytest.approx(1.0) and err.metadata["expected_wait_ms"] == "500"
    assert q.queued == 0  # nothing was queued for it
    # with enough time left the same call queues, and starts when the running one is done
    t, out = queued_in_thread(q, "Verify", clock.now + 1.6)
    wait_until(lambda: q.queued == 1, "the call queued")
    q.release(running)
    t.join(10)
    assert out and out[0].started is not None and q.running == 1


def test_a_full_queue_refuses_at_once_whatever_the_deadline():
    q, clock = queue(concurrency=1, max_queue=2)
    q.observe("Verify", 0.1)
    first = q.acquire("Verify", None)
    waiting = [queued_in_thread(q, "Verify", None) for _ in range(2)]
    wait_until(lambda: q.queued == 2, "two calls queued")
    err = refusal(q, "Verify", None)
    assert err.reason == QUEUE_FULL and err.retry_delay_s >= 0.1
    # the queue is FIFO and drains as slots free
    q.release(first)
    waiting[0][0].join(10)
    assert waiting[0][1][0].started is not None and q.queued == 1
    q.release(waiting[0][1][0])
    waiting[1][0].join(10)
    assert waiting[1][1][0].started is not None and q.queued == 0


def test_a_full_queue_refuses_before_any_estimate_exists():
    q, _ = queue(concurrency=1, max_queue=1)
    q.acquire("Verify", None)
    t, _ = queued_in_thread(q, "Verify", None)
    wait_until(lambda: q.queued == 1, "one call queued")
    assert refusal(q, "Verify", None).reason == QUEUE_FULL


def test_a_queued_call_leaves_when_it_could_no_longer_finish_in_time():
    q, clock = queue(concurrency=1, max_queue=3)
    q.observe("Verify", 0.0)  # the wait looks empty on arrival: the call is queued
    q.acquire("Verify", None)
    t, out = queued_in_thread(q, "Verify", clock.now + 0.05)
    wait_until(lambda: q.queued == 1, "the call queued")
    clock.now += 0.06  # its deadline passed while it waited (the real-time wake-up finds it)
    t.join(10)
    assert out and getattr(out[0], "reason", None) == DEADLINE_UNREACHABLE and q.queued == 0


def test_the_default_concurrency_is_the_cores_a_container_may_use(tmp_path):
    from services.common.config import usable_cores

    affinity = usable_cores(tmp_path / "absent")
    assert affinity >= 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path / "cpu.max") == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a limit of 1.5 CPUs
    assert usable_cores(tmp_path / "cpu.max") == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(tmp_path / "cpu.max") == 1


def test_unknown_settings_and_threads_that_cheap_rpcs_need_are_refused():
    assert ServerConfig(admission={"concurrency": 2, "max_queue": 8}).rpc_threads == 18
    with pytest.raises(ValidationError, match="max_workers"):
        ServerConfig(max_workers=10, admission={"concurrency": 2, "max_queue": 8})
    with pytest.raises(ValidationError):
        ServerConfig(admission={"slots": 3})


def test_freed_memory_is_trimmed_once_per_burst_after_the_idle_time():
    from services.common.server.memory import IdleTrimmer

    q, clock = queue(concurrency=1, max_queue=1)
    trimmer = IdleTrimmer(q, idle_s=2.0, clock=clock)
    assert trimmer.trim is not None  # glibc: the CI and production images
    assert not trimmer.check()  # no work yet: nothing to give back
    slot = q.acquire("Verify", None)
    clock.now += 5.0
    assert not trimmer.check()  # a call is running
    q.release(slot)
    clock.now += 1.0
    assert not trimmer.check()  # idle for less than idle_s
    clock.now += 1.5
    assert trimmer.check() and trimmer.trims == 1
    clock.now += 10.0
    assert not trimmer.check()  # no work since: once per burst


def test_a_service_may_run_its_own_number_of_worker_processes():
    from services.common.config import usable_cores

    cfg = ServerConfig.model_validate({"workers": 1, "face": {"port": 1, "workers": 0}, "voice": {"port": 2, "workers": 3}})
    assert (cfg.processes("face"), cfg.processes("voice"), cfg.processes("mfa")) == (usable_cores(), 3, 1)
    assert ServerConfig.model_validate({"workers": 2}).processes("voice") == 2
    with pytest.raises(ValidationError):
        ServerConfig.model_validate({"face": {"port": 1, "workers": -1}})
