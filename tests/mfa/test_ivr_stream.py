"""The IVR's voice factor streamed (MfaService.StreamVoiceFactor) through real MFA and voice
services on loopback: the caller's G.711 answer sent in 20 ms chunks as it is spoken passes as the
unary SubmitFactor does; a stalled, oversized or malformed stream, one closed without its end
message (a hang-up) or with a wrong one, and one for another tenant's session, are refused with
their codes before anything is written (the MFA's session, audit trail and lockout counter, the
voice service's audit trail, and the challenge, which stays unspent)."""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.errors import details_of
from services.common.server.auth import ROLES, token_sha256
from tests.conftest import require
from tests.mfa import spoken_digits
from tests.mfa.world import World, running_services

F = mfa_pb2
TENANT, OTHER = "bank-ivr-stream", "bank-other"
BANK_TOKEN, IVR_TOKEN = "tok-bank-stream", "tok-ivr-stream"
SPEAKER = "george"
CHUNK = 160  # 20 ms of 8 kHz mu-law
MULAW = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)


@pytest.fixture(scope="module")
def services(tmp_path_factory):  # (named so that tests/conftest.py marks the module as loading models)
    principals: list[dict] = [
        {"name": "bank-backend", "roles": list(ROLES), "token_sha256": token_sha256(BANK_TOKEN)},
        {"name": "ivr-platform", "roles": ["orchestrator"], "token_sha256": token_sha256(IVR_TOKEN),
         "tenants": [TENANT], "terminal": {"channel": "ivr"}}]
    with running_services(tmp_path_factory.mktemp("ivr-stream"), principals, BANK_TOKEN) as (bio, mfa):
        w = World(bio, mfa, TENANT, ivr_token=IVR_TOKEN)
        yield w
        w.close()


def header(s, nonce: str, fmt=MULAW, binding=None) -> F.StreamVoiceFactorRequest:
    return F.StreamVoiceFactorRequest(header=F.StreamVoiceFactorRequest.Header(
        session_id=s.session_id, challenge_nonce=nonce, format=fmt,
        binding=binding or F.CaptureBinding(terminal=F.TerminalCapture())))


def end(audio_bytes: int) -> F.StreamVoiceFactorRequest:
    return F.StreamVoiceFactorRequest(end=F.StreamVoiceFactorRequest.End(audio_bytes=audio_bytes))


def chunks(audio: bytes, size: int = CHUNK, paced: bool = False):
    """The audio in chunks of ``size`` bytes, then the end message; ``paced``: one chunk each 20 ms,
    as the caller speaks."""
    for i in range(0, len(audio), size):
        yield F.StreamVoiceFactorRequest(chunk=audio[i:i + size])
        if paced:
            time.sleep(size / 8000)
    yield end(len(audio))


def stream(world, messages, timeout: float = 120):
    return world.ivr.StreamVoiceFactor(iter(messages), timeout=timeout)


def refused(world, messages) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        stream(world, messages)
    return err.value.code(), details_of(err.value)["reason"]


def written(world, s) -> tuple:
    """What a refused stream must leave as it was: the session's factors, the audit trails'
    lengths (MFA and voice), the MFA's mfa.factor records of the session and the failures its
    subject's lockout counts."""
    orch = world.mfa.running["mfa"].definition.service
    voice_rt = world.bio.running["voice"].definition.service.rt
    session = orch.sessions.get(s.session_id)
    mfa_records = list(orch.rt.storage.audit.iter_records())
    factors = [json.loads(r.details) for r in mfa_records if r.event_type == "mfa.factor"]
    lock = orch.lockouts.store.lockouts.get(session.tenant_id, "subject", session.subject_id)
    return (len(session.state.factors), len(mfa_records), len(list(voice_rt.storage.audit.iter_records())),
            [f for f in factors if f["session_id"] == s.session_id], 0 if lock is None else lock.cost)


@pytest.fixture(scope="module")
def caller(services):
    """The enrolled caller (a telephone template) and their answer to a session's challenge."""
    world = services
    require(world.bio.voice_ok, "the voice service (SERVING, with its Verify RPC)")
    ref = world.enrol("caller-stream", utterances=spoken_digits.enrolment(SPEAKER), phone="+8613900000401")

    def answer(s):
        challenge = world.voice_challenge(s, world.ivr)
        audio = spoken_digits.heard_answer(world.voice_engine, challenge.digits, SPEAKER,
                                           random.Random(challenge.digits),
                                           subject=(ref.tenant_id, ref.subject_id), telephone=True)
        assert audio is not None, f"no takes of {SPEAKER} saying {challenge.digits} were heard"
        return audio, challenge.challenge.nonce

    return ref, answer


def errors_logged(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def wait_for(condition, what: str, limit_s: float = 60) -> None:
    """Polls ``condition`` until it holds; fails (it does not time anything) after ``limit_s``."""
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, f"{what} did not happen within {limit_s} s"
        time.sleep(0.02)


def voice_in_flight() -> float:
    return REGISTRY.get_sample_value("biogate_rpc_in_flight", {"service": "voice"}) or 0


def ended(caplog, rpc: str) -> str | None:
    """The code ``rpc``'s end was logged with by the interceptor (its last act on the call)."""
    codes = [getattr(r, "code", None) for r in caplog.records if r.getMessage() == "rpc" and getattr(r, "rpc", None) == rpc]
    return codes[-1] if codes else None


def stalled(messages, release: threading.Event):
    """``messages``, then silence: the IVR stops sending without closing the stream."""
    yield from messages
    release.wait(60)


def test_a_call_streamed_in_20_ms_chunks_passes_as_the_unary_voice_factor(services, caller, caplog):
    world = services
    ref, answer = caller
    caplog.set_level(logging.INFO)
    s = world.start_ivr(ref)
    audio, nonce = answer(s)
    some = list(chunks(audio))[:5]
    sent = 5 * CHUNK
    before = written(world, s)
    assert before[3] == []

    # refused streams first, each answering the session's challenge: none writes anything or
    # spends the challenge, which the genuine stream below then answers
    assert refused(world, [F.StreamVoiceFactorRequest(chunk=audio[:CHUNK]), *some]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REQUIRED")
    assert refused(world, [header(s, nonce), *some, header(s, nonce)]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "UNEXPECTED_HEADER")
    # closed without the end message: the caller hung up (gRPC may show a cancel so), nothing decided
    assert refused(world, [header(s, nonce), *some]) == (grpc.StatusCode.CANCELLED, "STREAM_NOT_ENDED")
    whole = list(chunks(audio))[:-1]  # the whole answer, so that only the end message is wrong
    assert refused(world, [header(s, nonce), *whole]) == (grpc.StatusCode.CANCELLED, "STREAM_NOT_ENDED")
    assert refused(world, [header(s, nonce), *some, end(sent + 1)]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "END_MISMATCH")
    assert refused(world, [header(s, nonce), *whole, end(len(audio)), some[0]]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "DATA_AFTER_END")
    assert refused(world, [header(s, nonce), *some, F.StreamVoiceFactorRequest(chunk=audio[:801])]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "CHUNK_SIZE")  # over 100 ms of mu-law
    silence = F.StreamVoiceFactorRequest(chunk=b"\xff" * 800)
    assert refused(world, [header(s, nonce), *some, *[silence] * 200]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "STREAM_TOO_LONG")  # over 20 s
    signed = F.CaptureBinding(device_id="dev_x", signature=b"\x01" * 64)
    code, _ = refused(world, [header(s, nonce, binding=signed), *some])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    wideband = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_WAV)
    code, _ = refused(world, [header(s, nonce, fmt=wideband), *some])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    release = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as err:
            stream(world, stalled([header(s, nonce), *some], release))
    finally:
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details_of(err.value)["reason"] == "STREAM_IDLE", err.value.details()
    assert written(world, s) == before
    # the whole answer and its end message, but the stream held open: the end message is the last,
    # which only the stream's close shows; the idle limit bounds the wait, and nothing is decided
    release = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as err:
            stream(world, stalled([header(s, nonce), *chunks(audio)], release))
    finally:
        release.set()
    assert (err.value.code(), details_of(err.value)["reason"]) == (grpc.StatusCode.DEADLINE_EXCEEDED, "STREAM_IDLE")
    assert written(world, s) == before

    r = stream(world, itertools.chain([header(s, nonce)], chunks(audio, paced=True)))  # as spoken, 20 ms a chunk
    assert r.result.passed and r.result.binding == "terminal" and r.result.llr > 0, r
    assert r.result.factor == F.FACTOR_TYPE_VOICE and r.attempts_left > 0
    after = written(world, s)
    assert after[0] == before[0] + 1
    (record,) = after[3]
    assert record["factor"] == "voice" and record["passed"] and record["binding"] == "terminal"
    assert record["via"] == "stream" and record["terminal"] == "ivr-platform"
    # the caller's faults above (operators page on ERROR) and the normal end: nothing at ERROR
    assert errors_logged(caplog) == []
    assert world.otp(s, stub=world.ivr).result.passed
    d = world.decide(s, stub=world.ivr)
    assert d.outcome == F.OUTCOME_ALLOW and set(d.amr) >= {"vbm", "sms"}, d

    # the answer belongs to its session: another session (with no such challenge) refuses it
    s2 = world.start_ivr(ref)
    code, _ = refused(world, [header(s2, nonce), *chunks(audio)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_an_ivr_that_hangs_up_mid_stream_ends_both_calls_with_nothing_logged_at_error(services, caller, caplog):
    """The IVR cancels while the voice service hears the stream: the MFA's call and its call to
    the voice service end, nothing is written, and nothing is logged at ERROR."""
    world = services
    ref, answer = caller
    s = world.start_ivr(ref)
    audio, nonce = answer(s)
    before = written(world, s)
    caplog.set_level(logging.INFO)
    wait_for(lambda: voice_in_flight() == 0, "the end of the earlier tests' calls to the voice service")
    release = threading.Event()
    call = world.ivr.StreamVoiceFactor.future(stalled([header(s, nonce), *list(chunks(audio))[:25]], release),
                                              timeout=120)
    try:
        wait_for(lambda: voice_in_flight() > 0, "the MFA's stream to the voice service")
        call.cancel()
        wait_for(lambda: ended(caplog, "StreamVoiceFactor") and ended(caplog, "StreamVerify"), "the end of both calls")
    finally:
        release.set()
    assert errors_logged(caplog) == []
    # CANCELLED, whether grpc's server sees the hang-up as such or as the end of the stream (its
    # pending read completes before the cancellation does): no end message came, nothing is decided
    assert ended(caplog, "StreamVoiceFactor") == "CANCELLED"
    assert ended(caplog, "StreamVerify") == "CANCELLED"
    assert written(world, s) == before


def test_a_fault_of_the_mfa_itself_mid_stream_is_still_logged_at_error(services, caller, caplog, monkeypatch):
    """Not the caller's doing: INTERNAL to the IVR, one ERROR record (the interceptor's, with the
    fault), the call to the voice service cancelled, nothing written."""
    from services.mfa import service

    world = services
    ref, answer = caller
    s = world.start_ivr(ref)
    audio, nonce = answer(s)
    before = written(world, s)

    real = service.stream_chunks

    def faulty(messages, rate, cfg):
        for n, chunk in enumerate(real(messages, rate, cfg)):
            if n == 10:
                raise RuntimeError("a fault of the MFA's own code")
            yield chunk

    monkeypatch.setattr(service, "stream_chunks", faulty)
    caplog.set_level(logging.INFO)
    with pytest.raises(grpc.RpcError) as err:
        stream(world, [header(s, nonce), *chunks(audio)])
    assert err.value.code() == grpc.StatusCode.INTERNAL
    wait_for(lambda: ended(caplog, "StreamVerify"), "the end of the voice service's call")
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.getMessage(), r.exc_info[0]) for r in logged] == [
        ("biogate.rpc", "unhandled error", RuntimeError)], errors_logged(caplog)
    assert written(world, s) == before


def test_a_stream_for_another_tenant_s_session_is_refused_before_anything_is_written(services, caller):
    world = services
    other = world.mfa_stub.StartAuthentication(F.StartAuthenticationRequest(
        subject=common_pb2.SubjectRef(tenant_id=OTHER, subject_id="someone"), channel=F.CHANNEL_IVR, action="login"))
    before = written(world, other)
    assert refused(world, [header(other, "n" * 16), F.StreamVoiceFactorRequest(chunk=b"\xff" * CHUNK)]) == (
        grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_ALLOWED")
    assert written(world, other) == before


def test_the_bank_back_end_is_no_terminal_and_cannot_stream_the_ivr_factor(services, caller):
    world = services
    ref, answer = caller
    s = world.start_ivr(ref)
    audio, nonce = answer(s)
    before = written(world, s)
    with pytest.raises(grpc.RpcError) as err:
        world.mfa_stub.StreamVoiceFactor(iter([header(s, nonce), *chunks(audio)]), timeout=120)
    assert details_of(err.value)["reason"] == "TERMINAL_NOT_REGISTERED"
    assert written(world, s) == before


def test_the_voice_service_hears_the_stream_before_the_ivr_closes_it(services, caller):
    """Chunks are passed on as they arrive, not gathered first: a header the voice service refuses
    (this caller has no voice template) is answered while the IVR still holds the stream open,
    long before the stream's idle limit would end it."""
    world = services
    ref = world.enrol("caller-no-voice", phone="+8613900000402")
    s = world.start_ivr(ref)
    nonce = world.voice_challenge(s, world.ivr).challenge.nonce
    before = written(world, s)
    release = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as err:
            stream(world, stalled([header(s, nonce), F.StreamVoiceFactorRequest(chunk=b"\xff" * CHUNK)], release))
    finally:
        release.set()
    assert (err.value.code(), details_of(err.value)["reason"]) == (grpc.StatusCode.NOT_FOUND, "NOT_ENROLLED")
    assert written(world, s) == before


def test_the_sdk_streams_the_ivr_s_voice_factor(services, caller):
    from biogate_client import BioGate, Credentials, FailedPrecondition

    world = services
    ref, _ = caller
    addresses = {name: server.address for name, server in {**world.bio.running, **world.mfa.running}.items()}
    with BioGate(**addresses, credentials=Credentials(token=IVR_TOKEN)) as ivr:
        s = ivr.start(ref.tenant_id, ref.subject_id, channel="ivr")
        with pytest.raises(FailedPrecondition) as err:  # a nonce this session was not given
            s.stream_terminal_voice(iter([b"\xff" * CHUNK] * 5), "n" * 16)
        assert err.value.reason == "CHALLENGE_NOT_IN_SESSION", err.value
        challenge = s.challenge("voice")
        audio = spoken_digits.heard_answer(world.voice_engine, challenge.digits, SPEAKER,
                                           random.Random(challenge.digits),
                                           subject=(ref.tenant_id, ref.subject_id), telephone=True)
        assert audio is not None
        r = s.stream_terminal_voice((audio[i:i + 4 * CHUNK] for i in range(0, len(audio), 4 * CHUNK)),
                                    challenge.challenge.nonce)  # 80 ms chunks
        assert r.result.passed and r.result.binding == "terminal", r


def test_the_callers_chunks_go_on_to_the_voice_service_in_blocks_of_at_most_the_hold():
    from services.mfa.factors.voice import held

    audio = bytes(range(256)) * 20  # 640 ms of mu-law
    parts = [audio[i:i + CHUNK] for i in range(0, len(audio), CHUNK)]
    now = [0.0]

    def clock() -> float:
        return now[0]

    def real_time(chunks, step_s: float):
        for c in chunks:
            yield c
            now[0] += step_s

    blocks = list(held(real_time(parts, 0.02), 8000, 0.2, clock))
    assert [len(b) for b in blocks] == [1600, 1600, 1600, 320] and b"".join(blocks) == audio
    assert list(held(iter(parts), 8000, 0.0, clock)) == parts  # no hold: each chunk as it came
    # a caller slower than real time: the block goes on with the first chunk that comes after the
    # hold, not once it is full
    assert [len(b) for b in held(real_time(parts[:5], 0.15), 8000, 0.2, clock)] == [480, 320]

    def refused_after(n: int):
        yield from parts[:n]
        raise ValueError("the caller's stream broke a limit")

    got = []
    with pytest.raises(ValueError):
        for b in held(refused_after(3), 8000, 0.2, clock):
            got.append(b)
    assert got == []  # raised at once, the held audio dropped with the stream
