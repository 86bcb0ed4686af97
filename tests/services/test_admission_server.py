"""Admission control as the server applies it (services/common/server/interceptor.py), on a bare
server with a probe servicer whose model work waits for the test: which RPCs take a slot, what a
refused call receives, and that cheap RPCs and health are answered while the slots are taken."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import context, metrics
from services.common.api.v1 import common_pb2, voice_pb2, voice_pb2_grpc
from services.common.client import connect
from services.common.errors import details_of
from services.common.server.admission import QUEUE_FULL
from services.common.server.bootstrap import RunningServer, ServiceDefinition
from tests.conftest import make_settings

SUBJECT = common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-1")


class Probe(voice_pb2_grpc.VoiceServiceServicer):
    """Verify and StreamVerify (model work) hold their slot until ``release``; GetEnrollment is cheap."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.working = threading.Semaphore(0)  # one release per call that reached its model work
        self.streamed = threading.Event()  # a StreamVerify handler read its header

    def Verify(self, request, ctx):
        self.working.release()
        self.release.wait(30)
        return voice_pb2.VerifyVoiceResponse(match=True)

    def StreamVerify(self, request_iterator, ctx):
        next(request_iterator)
        self.streamed.set()
        for _ in request_iterator:  # the slot is taken when the client half-closes
            pass
        self.working.release()
        self.release.wait(30)
        return voice_pb2.VerifyVoiceResponse(match=True)

    def GetEnrollment(self, request, ctx):
        return common_pb2.GetEnrollmentResponse()


@contextmanager
def serving(tmp_path, servicer: Probe, max_queue: int = 0):
    """The probe behind the real server bootstrap with one model-work slot and ``max_queue`` places."""
    settings = make_settings(tmp_path, server={"admission": {"concurrency": 1, "max_queue": max_queue}})
    definition = ServiceDefinition("voice", [voice_pb2.DESCRIPTOR.services_by_name["VoiceService"]],
                                   lambda s: voice_pb2_grpc.add_VoiceServiceServicer_to_server(servicer, s))
    server = RunningServer(settings, definition, port=0).start()
    assert server.ready.wait(10)
    token = json.loads(settings.dev_credentials_file.read_text())["dev-all"]
    try:
        with connect(server.address, token) as channel, grpc.insecure_channel(server.address) as plain:
            yield voice_pb2_grpc.VoiceServiceStub(channel), health_pb2_grpc.HealthStub(plain), server
    finally:
        servicer.release.set()
        server.stop(0)


@pytest.fixture
def probe(tmp_path):
    servicer = Probe()
    with serving(tmp_path, servicer) as (stub, health, server):
        yield servicer, stub, health, server


def verify_request() -> voice_pb2.VerifyVoiceRequest:
    return voice_pb2.VerifyVoiceRequest(subject=SUBJECT)


def shed_count(reason: str) -> float:
    return metrics.RPC_SHED.labels("voice", "Verify", reason)._value.get()


def test_a_call_finding_the_slot_taken_and_no_queue_is_refused_with_a_retry_hint(probe):
    servicer, stub, health, _ = probe
    first = stub.Verify.future(verify_request(), timeout=30)
    assert servicer.working.acquire(timeout=10)  # the first call holds the only slot
    before = shed_count(QUEUE_FULL)
    with pytest.raises(grpc.RpcError) as err:
        stub.Verify(verify_request(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = details_of(err.value)
    assert details["reason"] == QUEUE_FULL and details["retry_delay_s"] > 0
    assert details["metadata"]["concurrency"] == "1"
    assert shed_count(QUEUE_FULL) == before + 1
    # cheap RPCs and health do not wait behind the model work
    stub.GetEnrollment(common_pb2.GetEnrollmentRequest(subject=SUBJECT), timeout=10)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    servicer.release.set()
    assert first.result(timeout=10).match
    servicer.release.clear()
    # the slot is free again
    second = stub.Verify.future(verify_request(), timeout=30)
    assert servicer.working.acquire(timeout=10)
    servicer.release.set()
    assert second.result(timeout=10).match


def test_a_client_stream_takes_its_slot_when_it_ends_not_while_it_is_read(probe):
    servicer, stub, _, _ = probe
    hold = threading.Event()

    def slow_stream():
        yield voice_pb2.StreamVerifyVoiceRequest(header=voice_pb2.StreamVerifyVoiceRequest.Header(subject=SUBJECT))
        hold.wait(30)

    stream = stub.StreamVerify.future(slow_stream(), timeout=30)
    assert servicer.streamed.wait(10)
    # the stream is being read: the model-work slot is still free for a unary call
    unary = stub.Verify.future(verify_request(), timeout=30)
    assert servicer.working.acquire(timeout=10)
    hold.set()  # the stream ends while Verify holds the slot: refused at its end
    with pytest.raises(grpc.RpcError) as err:
        stream.result(timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and details_of(err.value)["reason"] == QUEUE_FULL
    servicer.release.set()
    assert unary.result(timeout=10).match


def test_a_stream_handler_admits_itself_before_its_work_and_only_once(tmp_path):
    taken = []

    class Once(Probe):
        def StreamVerify(self, request_iterator, ctx):
            next(request_iterator)
            context.admit()  # work before the end of the stream
            context.admit()  # a second call is a no-op
            taken.append(True)
            for _ in request_iterator:  # the end of the stream admits nothing more
                pass
            return voice_pb2.VerifyVoiceResponse(match=True)

    with serving(tmp_path, Once()) as (stub, _, _):
        header = voice_pb2.StreamVerifyVoiceRequest(header=voice_pb2.StreamVerifyVoiceRequest.Header(subject=SUBJECT))
        for _ in range(3):  # each releases its slot: the next is admitted
            assert stub.StreamVerify(iter([header, header]), timeout=10).match
    assert taken == [True] * 3


def test_a_call_cancelled_while_queued_does_no_model_work(tmp_path):
    servicer = Probe()
    with serving(tmp_path, servicer, max_queue=1) as (stub, _, _):
        first = stub.Verify.future(verify_request(), timeout=30)
        assert servicer.working.acquire(timeout=10)
        queued = stub.Verify.future(verify_request(), timeout=30)
        gauge = metrics.ADMISSION_QUEUED.labels("voice")
        for _ in range(1000):
            if gauge._value.get() == 1:
                break
            threading.Event().wait(0.01)
        assert gauge._value.get() == 1
        queued.cancel()
        for _ in range(1000):  # the server hears of the cancellation and the call leaves the queue
            if gauge._value.get() == 0:
                break
            threading.Event().wait(0.01)
        assert gauge._value.get() == 0
        servicer.release.set()
        assert first.result(timeout=10).match
        # the next call is served; the cancelled one never reached the model work
        assert stub.Verify(verify_request(), timeout=10).match
        assert servicer.working.acquire(timeout=10)  # the third call's
        assert not servicer.working.acquire(timeout=0.5)  # and no other


def test_a_handler_done_with_its_models_lets_the_next_call_in_before_it_ends(tmp_path):
    after_models = threading.Event()  # the first call's remaining work (its audit write) waits on this

    class Early(Probe):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def Verify(self, request, ctx):
            self.calls += 1
            if self.calls == 1:
                context.done_with_models()
                context.done_with_models()  # a second release is a no-op: the slot is not freed twice
                self.working.release()
                after_models.wait(30)
                return voice_pb2.VerifyVoiceResponse(match=True)
            return super().Verify(request, ctx)

    servicer = Early()
    with serving(tmp_path, servicer) as (stub, _, server):
        first = stub.Verify.future(verify_request(), timeout=30)
        assert servicer.working.acquire(timeout=10)
        second = stub.Verify.future(verify_request(), timeout=30)  # no queue: admitted only if the slot is free
        assert servicer.working.acquire(timeout=10)
        assert server.interceptor.admission.running == 1
        # the slot is the second call's: a third finds it taken (the first's release was not counted twice)
        with pytest.raises(grpc.RpcError) as err:
            stub.Verify(verify_request(), timeout=30)
        assert details_of(err.value)["reason"] == QUEUE_FULL
        servicer.release.set()
        after_models.set()
        assert first.result(timeout=10).match and second.result(timeout=10).match
