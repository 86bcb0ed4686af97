import threading
import time

import pytest

from services.face.batching import BatcherClosed, Inline, MicroBatcher


def test_concurrent_callers_get_their_own_results_in_batches():
    sizes = []

    def fn(items):
        sizes.append(len(items))
        time.sleep(0.005)  # a model call: callers queue up meanwhile
        return [x * x for x in items]

    b = MicroBatcher(fn, max_batch=8, max_wait_ms=5)
    results: dict[int, int] = {}
    errors = []

    def worker(k):
        try:
            for i in range(k * 100, k * 100 + 25):
                results[i] = b.submit(i, timeout=10)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    assert not errors
    assert len(results) == 16 * 25 and all(v == k * k for k, v in results.items())
    assert max(sizes) <= 8 and sum(sizes) == 400
    assert max(sizes) > 1  # requests were actually batched together
    assert b.items == 400 and b.batches == len(sizes)


def test_submit_many_keeps_order():
    b: MicroBatcher[int, str] = MicroBatcher(lambda xs: [str(x) for x in xs], max_batch=3, max_wait_ms=1)
    assert b.submit_many(list(range(10))) == [str(i) for i in range(10)]
    b.close()


def test_errors_reach_every_caller_of_the_batch_and_the_worker_survives():
    def fn(items):
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return items

    b = MicroBatcher(fn, max_batch=4, max_wait_ms=1)
    with pytest.raises(ValueError):
        b.submit(-1, timeout=5)
    assert b.submit(3, timeout=5) == 3


def test_wrong_result_count_is_an_error():
    b: MicroBatcher[int, int] = MicroBatcher(lambda xs: [], max_batch=2)
    with pytest.raises(RuntimeError):
        b.submit(1, timeout=5)
    b.close()


def test_close_finishes_queued_items_then_refuses():
    def slow(xs: list[int]) -> list[int]:
        time.sleep(0.01)
        return xs

    b = MicroBatcher(slow, max_batch=2, max_wait_ms=0)
    futures = [b.submit_async(i) for i in range(6)]
    b.close()
    assert [f.result(timeout=1) for f in futures] == list(range(6))
    with pytest.raises(BatcherClosed):
        b.submit(1)


def test_inline_runs_on_the_callers_thread_in_chunks_and_reports_errors_through_the_future():
    calls: list[tuple[str, int]] = []

    def fn(items):
        if any(x < 0 for x in items):
            raise ValueError("negative")
        calls.append((threading.current_thread().name, len(items)))
        return [x * x for x in items]

    b = Inline(fn, max_batch=3)
    assert b.submit_many(list(range(7))) == [x * x for x in range(7)]
    assert [n for _, n in calls] == [3, 3, 1] and {t for t, _ in calls} == {threading.current_thread().name}
    assert b.submit(4) == 16 and b.submit_async(5).result() == 25
    failed = b.submit_async(-1)
    with pytest.raises(ValueError):
        failed.result()
    assert b.items == 9 and b.batches == 5
    with pytest.raises(RuntimeError):
        Inline[int, int](lambda xs: [], max_batch=2).submit(1)


def test_a_caller_past_its_rpc_deadline_is_refused_and_its_items_never_run():
    """A call whose deadline passes while a model's queue is busy gets DEADLINE_EXCEEDED, and the
    worker skips its items instead of running work nobody waits for (the worker is held by the
    first item until the test lets it go, so the deadline passes first whatever the machine's speed)."""
    import grpc

    from services.common import context
    from services.common.errors import ServiceError

    gate, seen = threading.Event(), []

    def fn(items):
        seen.extend(items)
        gate.wait(30)
        return items

    b = MicroBatcher(fn, max_batch=1, max_wait_ms=0)
    first = b.submit_async(1)
    for _ in range(2000):
        if seen:
            break
        time.sleep(0.005)
    token = context.deadline.set(time.monotonic() + 0.05)
    try:
        with pytest.raises(ServiceError) as err:
            b.submit_many([2, 3])
    finally:
        context.deadline.reset(token)
    gate.set()
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.reason == "MODEL_QUEUE_DEADLINE"
    assert first.result(timeout=5) == 1
    assert b.submit(4, timeout=5) == 4  # outside an RPC: no deadline but its own timeout
    assert seen == [1, 4]
    b.close()


def test_inline_starts_no_model_run_past_the_rpc_deadline():
    import grpc

    from services.common import context
    from services.common.errors import ServiceError

    seen: list[int] = []

    def record(items: list[int]) -> list[int]:
        seen.extend(items)
        return items

    b = Inline(record, max_batch=2)
    token = context.deadline.set(time.monotonic() - 1.0)
    try:
        with pytest.raises(ServiceError) as err:
            b.submit_many([1, 2, 3])
    finally:
        context.deadline.reset(token)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and seen == []
    token = context.deadline.set(time.monotonic() + 600.0)
    try:
        assert b.submit_many([1, 2, 3]) == [1, 2, 3]
    finally:
        context.deadline.reset(token)


def test_inline_runners_sharing_a_run_limit_run_no_more_at_once_on_its_threads_and_the_rest_wait():
    """Two models' inline runners under one bound of 2: six concurrent callers, held inside the model
    until the test lets them go, run 2 at a time on the bound's own two threads; the other 4 wait
    (the waiting gauge says so) and then run, every caller getting its own result; a waiting caller
    whose RPC deadline passes gets DEADLINE_EXCEEDED and its item never runs."""
    import grpc

    from services.common import context, metrics
    from services.common.batching import RunLimit
    from services.common.errors import ServiceError

    limit = RunLimit(2, "test-bound")
    waiting = metrics.MODEL_RUNS_WAITING.labels("test-bound")
    go, lock = threading.Event(), threading.Lock()
    inside = {"now": 0, "most": 0}
    ran: list[tuple[str, int]] = []

    def fn(items):
        with lock:
            inside["now"] += 1
            inside["most"] = max(inside["most"], inside["now"])
            ran.extend((threading.current_thread().name, x) for x in items)
        go.wait(30)
        with lock:
            inside["now"] -= 1
        return [x * 10 for x in items]

    runners = [Inline(fn, max_batch=1, name=f"m{i}", limit=limit) for i in range(2)]
    results: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, runners[i % 2].submit_many([i])))
               for i in range(6)]
    for t in threads:
        t.start()
    for _ in range(2000):
        if inside["now"] == 2 and waiting._value.get() == 4:
            break
        time.sleep(0.005)
    assert inside["now"] == 2 and waiting._value.get() == 4 and limit.running == 2 and limit.waiting == 4
    token = context.deadline.set(time.monotonic() + 0.05)
    try:
        with pytest.raises(ServiceError) as err:
            runners[0].submit_many([99])
    finally:
        context.deadline.reset(token)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    go.set()
    for t in threads:
        t.join(30)
    assert results == {i: [i * 10] for i in range(6)}
    assert sorted(x for _, x in ran) == list(range(6))  # 99 never ran
    assert len({name for name, _ in ran}) == 2 and all(name.startswith("test-bound-model") for name, _ in ran)
    assert inside["most"] == 2 and limit.most_running == 2 and waiting._value.get() == 0 and limit.waiting == 0
    limit.close()
    unbounded = RunLimit(None, "test-unbounded")
    here: list[str] = []

    def where(xs: list[int]) -> list[int]:
        here.append(threading.current_thread().name)
        return xs

    assert Inline(where, limit=unbounded).submit_many([1, 2]) == [1, 2]
    assert here == [threading.current_thread().name] and unbounded.most_running == 1
