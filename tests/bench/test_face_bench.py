from bench.face_bench import tail_by_probe_size
from bench.loadgen import OpenLoopResult, Outcome
from services.common.api.v1 import common_pb2, face_pb2


def test_the_open_loop_tail_is_split_by_the_probes_size():
    requests = [face_pb2.VerifyFaceRequest(image=common_pb2.Image(data=b"x" * (1000 * (k + 1)))) for k in range(10)]
    result = OpenLoopResult(10.0, 2.0, 30.0)
    # 20 calls, the requests cycled: the 10 KB probe (the largest tenth) takes 100 ms, the others 10 ms;
    # answers come back out of order, and one call of the rest was refused
    for i in reversed(range(20)):
        code = "RESOURCE_EXHAUSTED" if i == 3 else "OK"
        result.outcomes.append(Outcome(i * 0.1, 0.1 if i % 10 == 9 else 0.01, code))
    line = tail_by_probe_size(result, requests)
    assert line == ("probes of 10 KB and more: 2 calls, p50 100.0 / p99 100.0 ms; "
                    "the rest: 17, p50 10.0 / p99 10.0 ms")
