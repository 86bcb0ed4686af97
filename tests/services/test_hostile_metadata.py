"""Hostile request metadata (issue 12): two `authorization` headers (last one won: enroller then
admin got admin), and personal data sent as `x-request-id` (logged verbatim)."""

from __future__ import annotations

import json

import grpc
import pytest

from services.common import metrics
from services.common.api.v1 import common_pb2, mfa_pb2, mfa_pb2_grpc
from services.common.errors import details_of
from services.common.server import interceptor as interceptor_module
from services.common.server.bootstrap import RunningServer, ServiceDefinition
from tests.conftest import make_settings


class Probe(mfa_pb2_grpc.MfaServiceServicer):
    """Answers the admin-only UnlockSubject, and GetSigningKeys (any role)."""

    def UnlockSubject(self, request, ctx):
        return mfa_pb2.UnlockSubjectResponse()

    def GetSigningKeys(self, request, ctx):
        return mfa_pb2.GetSigningKeysResponse(jwks_json="{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("metadata"))
    definition = ServiceDefinition("mfa", [mfa_pb2.DESCRIPTOR.services_by_name["MfaService"]],
                                   lambda s: mfa_pb2_grpc.add_MfaServiceServicer_to_server(Probe(), s),
                                   tenant_lookups={"session": lambda _: None, "review": lambda _: None})
    running = RunningServer(settings, definition, port=0).start()
    assert running.ready.wait(10)
    yield running, json.loads(settings.dev_credentials_file.read_text())
    running.stop(0)


@pytest.fixture
def logs(captured_logs):
    return captured_logs


def unlock(server, metadata):
    running, _ = server
    with grpc.insecure_channel(running.address) as channel:
        stub = mfa_pb2_grpc.MfaServiceStub(channel)
        request = mfa_pb2.UnlockSubjectRequest(subject=common_pb2.SubjectRef(tenant_id="bank-a", subject_id="c-1"))
        try:
            _, call = stub.UnlockSubject.with_call(request, metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            assert isinstance(err, grpc.Call)
            return err.code(), details_of(err)["reason"], dict(err.initial_metadata() or ())
        return grpc.StatusCode.OK, "", dict(call.initial_metadata())


@pytest.mark.parametrize("order", [("dev-enroller", "dev-admin"), ("dev-admin", "dev-enroller"), ("dev-admin", "dev-admin")])
def test_two_authorization_headers_are_refused_whatever_their_order(server, order):
    tokens = server[1]
    code, reason, _ = unlock(server, [("authorization", f"Bearer {tokens[name]}") for name in order])
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "DUPLICATE_CREDENTIALS")


def test_one_authorization_header_still_works(server):
    tokens = server[1]
    assert unlock(server, [("authorization", f"Bearer {tokens['dev-admin']}")])[:2] == (grpc.StatusCode.OK, "")
    assert unlock(server, [("authorization", f"Bearer {tokens['dev-enroller']}")])[:2] == (
        grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")


HOSTILE_IDS = {
    "mobile": "13800138000",
    "e164": "+8613800138000",
    "PRC ID number": "11010519491231002X",
    "e-mail": "li.lei@example.com",
    "bank code": "102100099996",
    "log injection": 'x", "level": "ERROR',
    "too long": "r" * 65,
}


@pytest.mark.parametrize("kind", list(HOSTILE_IDS))
def test_a_request_id_with_personal_data_or_odd_characters_is_replaced_and_never_logged(server, logs, kind):
    tokens = server[1]
    sent = HOSTILE_IDS[kind]
    code, _, meta = unlock(server, [("authorization", f"Bearer {tokens['dev-admin']}"), ("x-request-id", sent)])
    assert code == grpc.StatusCode.OK
    used = meta["x-request-id"]
    assert used != sent and len(used) == 32 and int(used, 16) >= 0  # a generated one, returned to the caller
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    rpc = [line for line in lines if line.get("rpc") == "UnlockSubject"]
    assert rpc and rpc[-1]["request_id"] == used
    assert sent not in logs.getvalue()


def test_a_plain_request_id_is_kept(server, logs):
    tokens = server[1]
    code, _, meta = unlock(server, [("authorization", f"Bearer {tokens['dev-admin']}"), ("x-request-id", "req-8f3a2c:1")])
    assert code == grpc.StatusCode.OK and meta["x-request-id"] == "req-8f3a2c:1"
    assert '"request_id": "req-8f3a2c:1"' in logs.getvalue()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\xff\x01", b"\x12\x05ab"])
def test_bytes_that_are_no_protobuf_message_are_invalid_argument_not_internal(server, garbage):
    running, tokens = server
    with grpc.insecure_channel(running.address) as channel:
        raw: grpc.UnaryUnaryMultiCallable = channel.unary_unary("/biogate.v1.MfaService/UnlockSubject")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            raw(garbage, metadata=(("authorization", f"Bearer {tokens['dev-admin']}"),), timeout=10)
    assert (err.value.code(), details_of(err.value)["reason"]) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert "UnlockSubjectRequest" in (err.value.details() or "")


# The interceptor builds each method's wrapped handler once, not on every call (issue 13: the rebuild was
# part of the service's CPU outside the models); the checks it wraps still run on every call.
def _total(method: str, code: str) -> float:
    return metrics.RPC_TOTAL.labels("mfa", method, code)._value.get()


def test_each_method_s_handler_is_wrapped_once_and_every_call_still_checked(server, monkeypatch):
    running, tokens = server
    built: list[object] = []
    real = grpc.unary_unary_rpc_method_handler

    def counting(*args, **kwargs):
        built.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(interceptor_module.grpc, "unary_unary_rpc_method_handler", counting)
    ok, denied = _total("UnlockSubject", "OK"), _total("UnlockSubject", "PERMISSION_DENIED")
    unlock = mfa_pb2.UnlockSubjectRequest(subject=common_pb2.SubjectRef(tenant_id="bank-a", subject_id="c-1"))
    with grpc.insecure_channel(running.address) as channel:
        stub = mfa_pb2_grpc.MfaServiceStub(channel)
        for _ in range(3):
            stub.UnlockSubject(unlock, metadata=[("authorization", f"Bearer {tokens['dev-admin']}")], timeout=10)
            with pytest.raises(grpc.RpcError) as refused:  # the role check runs on every call
                stub.UnlockSubject(unlock, metadata=[("authorization", f"Bearer {tokens['dev-enroller']}")],
                                   timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            stub.GetSigningKeys(mfa_pb2.GetSigningKeysRequest(),
                                metadata=[("authorization", f"Bearer {tokens['dev-verifier']}")], timeout=10)
    # One wrapped handler per method (at most: an earlier test of this module may have built one).
    assert len(built) <= 2
    assert (_total("UnlockSubject", "OK") - ok, _total("UnlockSubject", "PERMISSION_DENIED") - denied) == (3, 3)
