"""Client streams are read under budgets (idle timeout, the RPC's deadline, total bytes), so silent or
trickling IVR streams cannot hold the voice service's worker threads (issue 12: 20 header-only
StreamVerify calls blocked every other voice RPC; a slow stream was held 76 s)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from services.common import metrics
from services.common.api.v1 import common_pb2, voice_pb2, voice_pb2_grpc
from services.common.errors import details_of
from tests.conftest import ServiceHarness, make_settings

WORKERS = 4
IDLE_S = 1.0
RPC_TIMEOUT_S = 4.0
MAX_BYTES = 40_000
SUBJECT = common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-streams")
HEADER = voice_pb2.StreamVerifyVoiceRequest(header=voice_pb2.StreamVerifyVoiceRequest.Header(
    subject=SUBJECT, format=common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)))
SILENCE_20MS = voice_pb2.StreamVerifyVoiceRequest(chunk=bytes([0xFF]) * 160)


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("streams") / "data",
                             server={"max_workers": WORKERS, "stream_idle_timeout_s": IDLE_S,
                                     "rpc_timeout_s": RPC_TIMEOUT_S, "stream_max_bytes": MAX_BYTES,
                                     "admission": {"concurrency": 1, "max_queue": 1}},
                             # the stream budgets, not the digit challenge, are what these tests are about
                             voice={"replay_store": "memory", "tenants": {"bank-a": {"require_challenge": False}}})
    harness = ServiceHarness(settings)
    harness.start("voice")
    with harness.channel("voice") as channel:
        yield voice_pb2_grpc.VoiceServiceStub(channel)
    harness.stop()


def outcome(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), details_of(err)["reason"]
    return grpc.StatusCode.OK, ""


def test_more_idle_streams_than_workers_leave_other_rpcs_answered(voice):
    release = threading.Event()

    def header_then_silence():
        yield HEADER
        release.wait(30)  # the client sends nothing more (bounded: released when the test ends)

    idle: list[tuple[grpc.StatusCode, str]] = []
    streams = [threading.Thread(target=lambda: idle.append(outcome(
        lambda: voice.StreamVerify(header_then_silence(), timeout=30)))) for _ in range(3 * WORKERS)]
    try:
        for t in streams:
            t.start()
        in_flight = metrics.RPC_IN_FLIGHT.labels("voice")
        until = time.monotonic() + 10
        while in_flight._value.get() < WORKERS and time.monotonic() < until:
            time.sleep(0.01)
        assert in_flight._value.get() >= WORKERS  # the streams hold every worker thread
        # Every worker thread is taken by an idle stream at first; without the idle timeout these
        # calls would wait for the streams' 30 s and run out of their own deadline.
        enrolment = outcome(lambda: voice.GetEnrollment(common_pb2.GetEnrollmentRequest(subject=SUBJECT),
                                                        timeout=8 * IDLE_S))
        verify = outcome(lambda: voice.Verify(voice_pb2.VerifyVoiceRequest(subject=SUBJECT), timeout=8 * IDLE_S))
        for t in streams:
            t.join(8 * IDLE_S)
    finally:
        release.set()
        for t in streams:
            t.join(30)
    assert enrolment == (grpc.StatusCode.OK, "")
    assert verify == (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_AUDIO")
    assert idle == [(grpc.StatusCode.DEADLINE_EXCEEDED, "STREAM_IDLE")] * len(streams)


def test_a_trickling_stream_is_cut_at_the_rpc_deadline(voice):
    sent = 0
    stop = threading.Event()

    def trickle():
        nonlocal sent
        yield HEADER
        for _ in range(200):  # one 20 ms chunk every half idle timeout: never idle, never done
            if stop.wait(IDLE_S / 2):
                return
            sent += 1
            yield SILENCE_20MS

    try:
        got = outcome(lambda: voice.StreamVerify(trickle(), timeout=60))
    finally:
        stop.set()
    assert got == (grpc.StatusCode.DEADLINE_EXCEEDED, "STREAM_DEADLINE")
    # cut at rpc_timeout_s: about RPC_TIMEOUT_S / (IDLE_S / 2) chunks, far from the 200 offered
    assert sent < 4 * RPC_TIMEOUT_S / IDLE_S


def test_a_stream_over_the_byte_budget_is_refused(voice):
    def flood():
        yield HEADER
        for _ in range(2 * MAX_BYTES // 160):
            yield SILENCE_20MS

    assert outcome(lambda: voice.StreamVerify(flood(), timeout=30)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                       "STREAM_TOO_LARGE")


def test_a_stream_within_budget_still_reaches_the_service(voice):
    # silence within every budget: the service itself answers (no speech), not the stream reader
    def short():
        yield HEADER
        for _ in range(50):
            yield SILENCE_20MS
        yield voice_pb2.StreamVerifyVoiceRequest(end=voice_pb2.StreamVerifyVoiceRequest.End(audio_bytes=50 * 160))

    code, reason = outcome(lambda: voice.StreamVerify(short(), timeout=30))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert reason not in ("STREAM_IDLE", "STREAM_DEADLINE", "STREAM_TOO_LARGE", "")
