"""The face/voice clients: circuit breaker, bounded retries of idempotent calls, deadlines, and
the caller's own errors passed through. Against a dead port and a scripted gRPC FaceService on
loopback (the network boundary is real; the e2e suite uses the real services)."""

from __future__ import annotations

import time
from concurrent import futures
from itertools import pairwise
from typing import Any

import grpc
import pytest
from pydantic import ValidationError

from services.common import errors
from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
from services.common.config import usable_cores
from services.mfa.config import ClientTarget
from services.mfa.clients import BiometricClient, CircuitBreaker, ServiceUnavailable
from services.settings import load_config


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_breaker_opens_after_consecutive_failures_and_half_opens_for_one_trial():
    clock = FakeClock()
    b = CircuitBreaker(3, 10.0, clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.t = 10.0
    assert b.state == "half_open" and b.allow() and not b.allow()  # exactly one trial
    b.failure()
    assert b.state == "open"
    clock.t = 20.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


class ScriptedFace(face_pb2_grpc.FaceServiceServicer):
    def __init__(self):
        self.script: list = []
        self.calls = 0

    def Verify(self, request, context):
        self.calls += 1
        step: Any = self.script.pop(0) if self.script else "ok"
        if step == "slow":
            time.sleep(1.0)
        elif step == "shed":  # what the service's admission control answers (services/common/server)
            shed = errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full", "QUEUE_FULL",
                                       retry_delay_s=0.25)
            context.abort_with_status(shed.to_status())
        elif step != "ok":
            context.abort(step, f"scripted {step.name}")
        return face_pb2.VerifyFaceResponse(match=True, score=0.7, llr=5.0, model_id="m")


@pytest.fixture
def face_server():
    servicer = ScriptedFace()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    face_pb2_grpc.add_FaceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def client(target, **cfg):
    return BiometricClient("face", target, None, ClientTarget(**{"deadline_s": 0.5, "retries": 2, **cfg}),
                           face_pb2_grpc.FaceServiceStub, 1 << 20)


REQ = face_pb2.VerifyFaceRequest(subject=common_pb2.SubjectRef(tenant_id="t", subject_id="s"))


def test_idempotent_calls_are_retried_on_unavailable(face_server):
    servicer, target = face_server
    servicer.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    assert client(target, deadline_s=3.0).call("Verify", REQ, idempotent=True).match
    assert servicer.calls == 3
    servicer.script, servicer.calls = [grpc.StatusCode.UNAVAILABLE], 0
    with pytest.raises(ServiceUnavailable):  # a single-use nonce must not be replayed
        client(target).call("Verify", REQ, idempotent=False)
    assert servicer.calls == 1


def test_the_callers_fault_is_passed_through_and_keeps_the_circuit_closed(face_server):
    servicer, target = face_server
    c = client(target, breaker_failures=1)
    servicer.script = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION]
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        with pytest.raises(errors.ServiceError) as err:
            c.call("Verify", REQ, idempotent=True)
        assert err.value.code == code
    assert c.breaker.state == "closed" and servicer.calls == 2


def test_a_shedding_service_is_up_its_refusal_and_retry_hint_are_passed_back(face_server):
    servicer, target = face_server
    c = client(target, breaker_failures=1)
    servicer.script = ["shed", "shed"]
    for _ in range(2):
        with pytest.raises(errors.ServiceError) as err:
            c.call("Verify", REQ, idempotent=True)
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
        assert err.value.retry_delay_s == pytest.approx(0.25)
    assert c.breaker.state == "closed" and servicer.calls == 2  # not retried, no degraded mode
    assert c.call("Verify", REQ, idempotent=True).match


def test_a_slow_service_costs_at_most_the_deadline(face_server):
    servicer, target = face_server
    servicer.script = ["slow"]  # answers after 1 s, twice the client's 0.5 s deadline
    c = client(target, retries=0)
    with pytest.raises(ServiceUnavailable) as err:
        c.call("Verify", REQ, idempotent=True)
    assert err.value.why == "DEADLINE_EXCEEDED" and servicer.calls == 1  # cut at the deadline, not retried


def test_a_dead_service_opens_the_circuit_and_later_calls_fail_fast(face_server):
    servicer, target = face_server
    servicer.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    c = client(target, retries=0, breaker_failures=2, breaker_reset_s=60, connections=2)
    for _ in range(2):  # on the two connections in turn: the breaker is the target's
        with pytest.raises(ServiceUnavailable):
            c.call("Verify", REQ, idempotent=True)
    assert not c.available and servicer.calls == 2
    with pytest.raises(ServiceUnavailable) as err:
        c.call("Verify", REQ, idempotent=True)
    assert err.value.why == "circuit open" and servicer.calls == 2  # refused without reaching the service


def test_an_exhausted_caller_deadline_is_not_extended(face_server):
    servicer, target = face_server
    with pytest.raises(ServiceUnavailable) as err:
        client(target).call("Verify", REQ, idempotent=True, budget_s=0.0)
    assert "deadline" in err.value.why and servicer.calls == 0


def test_a_call_takes_the_least_busy_connection_the_next_in_turn_among_equals_and_close_closes_all(face_server):
    servicer, target = face_server
    c = client(target, connections=3)
    pool = c.connections
    assert len(pool.channels) == 3
    with pool.take() as a, pool.take() as b:
        with pool.take() as third:
            assert len({id(a), id(b), id(third)}) == 3
        for _ in range(2):  # the one idle connection, whoever's turn it is
            with pool.take() as again:
                assert again is third
    order = []
    for _ in range(6):  # none busy: round all of them
        with pool.take() as stub:
            order.append(stub)
            assert stub.Verify(REQ, timeout=5).match  # each its own working channel
    assert len(set(map(id, order[:3]))) == 3 and order[3:] == order[:3]
    assert c.call("Verify", REQ, idempotent=True).match and servicer.calls == 7
    c.close()
    for stub in order[:3]:
        with pytest.raises(ValueError, match="closed channel"):
            stub.Verify(REQ, timeout=5)


def test_connections_are_configured_bounded_and_default_to_four_per_usable_core(monkeypatch):
    monkeypatch.setenv("BIOGATE_CLIENTS__VOICE__CONNECTIONS", "3")
    settings = load_config(None)
    assert settings.clients.voice.connection_count == 3
    assert settings.clients.face.connections == 0 and settings.clients.face.connection_count == 4 * usable_cores()
    for bad in (-1, 257):
        with pytest.raises(ValidationError, match="connections"):
            ClientTarget(connections=bad)


def test_calls_alternate_between_workers_whatever_their_share_of_the_connections():
    """The kernel put 6 of 8 connections on one worker: calls that never overlap (an open loop at
    low load, where every pick is a tie) must still go to the two workers in turn, not 6 : 2 as the
    connections come in turn; with one call in flight the next goes to the other worker."""
    from services.mfa.clients import Connections

    channels = [grpc.insecure_channel("127.0.0.1:9") for _ in range(8)]  # never dialled: no call is made
    pool = Connections(channels, face_pb2_grpc.FaceServiceStub)
    try:
        stubs = []
        for _ in range(8):  # before answers name the workers, each connection counts as its own: all in turn
            with pool.take() as stub:
                stubs.append(stub)
        assert len({id(s) for s in stubs}) == 8
        for k, stub in enumerate(stubs):
            pool.landed(stub, "w-a" if k < 6 else "w-b")
        picks = []
        for _ in range(40):
            with pool.take() as stub:
                picks.append(pool.worker_of(stub))
        assert picks.count("w-a") == picks.count("w-b") == 20
        assert all(a != b for a, b in pairwise(picks))
        for _ in range(8):
            with pool.take() as busy, pool.take() as other:
                assert pool.worker_of(busy) != pool.worker_of(other)
    finally:
        pool.close()
