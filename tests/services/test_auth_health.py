"""Every service on loopback: health, reflection, and authentication/authorisation of every RPC."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.common.api.v1 import common_pb2, face_pb2, mfa_pb2, voice_pb2
from services.common.client import connect
from services.common.errors import details_of
from services.common.server.auth import ROLES, refuse_dev_credentials_off_loopback, token_sha256
from services.common.server.interceptor import roles_by_method
from tests.conftest import ServiceHarness, health_check, make_settings, reflection_info

DESCRIPTORS = {
    "face": face_pb2.DESCRIPTOR.services_by_name["FaceService"],
    "voice": voice_pb2.DESCRIPTOR.services_by_name["VoiceService"],
    "mfa": mfa_pb2.DESCRIPTOR.services_by_name["MfaService"],
}
ROLE_TOKENS = {role: f"token-{role}" for role in ROLES}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    principals = [
        {"name": f"only-{role}", "roles": [role], "token_sha256": token_sha256(token)}
        for role, token in ROLE_TOKENS.items()
    ]
    principals.append({"name": "bank-a-all", "roles": list(ROLES), "tenants": ["bank-a"],
                       "token_sha256": token_sha256("token-bank-a")})
    settings = make_settings(tmp_path_factory.mktemp("data"), auth={"principals": principals, "dev_credentials": False})
    h = ServiceHarness(settings)
    for name in DESCRIPTORS:
        h.start(name)
    yield h
    h.stop()


def call(channel: grpc.Channel, service, method, timeout: float = 10.0):
    """Calls any RPC with an empty request; returns the status code."""
    path = f"/{service.full_name}/{method.name}"
    request_cls = _message_class(method.input_type)
    response_cls = _message_class(method.output_type)
    kwargs = dict(request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString)
    try:
        if method.client_streaming:
            channel.stream_unary(path, **kwargs)(iter([request_cls()]), timeout=timeout)
        else:
            channel.unary_unary(path, **kwargs)(request_cls(), timeout=timeout)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _message_class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def every_method():
    for name, service in DESCRIPTORS.items():
        for method in service.methods:
            yield name, service, method


@pytest.mark.parametrize("name", list(DESCRIPTORS))
def test_health_is_serving_and_reflection_lists_the_service(harness, name):
    address = harness.running[name].address
    with grpc.insecure_channel(address) as channel:  # health needs no credentials
        reply = health_check(channel)(health_pb2.HealthCheckRequest(service=DESCRIPTORS[name].full_name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with connect(address, ROLE_TOKENS["auditor"]) as channel:
        replies = reflection_info(channel)(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        listed = {s.name for r in replies for s in r.list_services_response.service}
    assert DESCRIPTORS[name].full_name in listed and "grpc.health.v1.Health" in listed


@pytest.mark.parametrize("name", list(DESCRIPTORS))
def test_reflection_needs_credentials(harness, name):
    with connect(harness.running[name].address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(reflection_info(channel)(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("name,service,method", list(every_method()), ids=lambda v: getattr(v, "name", v))
def test_unauthenticated_calls_are_refused(harness, name, service, method):
    for token in (None, "not-a-known-token"):
        with connect(harness.running[name].address, token) as channel:
            assert call(channel, service, method) == grpc.StatusCode.UNAUTHENTICATED


# What the MFA calls on face and voice (its factors' verifications and challenges, the erasure it fans out).
MFA_CALLS = {"face": {"Verify", "StartLivenessChallenge", "SubmitLivenessChallenge", "DeleteSubject"},
             "voice": {"Verify", "StreamVerify", "StartVoiceChallenge", "DeleteSubject"}}


@pytest.mark.parametrize("name", sorted(MFA_CALLS))
def test_the_bank_systems_role_reaches_face_and_voice_only_through_the_mfa(harness, name):
    """`orchestrator` (the bank's login and payment systems, and terminals) calls the MFA, whose policy
    decides; only the MFA's own role, `service`, runs face and voice for it. When one role did both,
    the bank's login system could erase templates (DeleteSubject) or search the gallery directly."""
    service = DESCRIPTORS[name]
    roles = roles_by_method([service])
    assert {m.name for m in service.methods if "service" in roles[f"/{service.full_name}/{m.name}"]} == MFA_CALLS[name]
    with connect(harness.running[name].address, ROLE_TOKENS["orchestrator"]) as channel:
        for method in service.methods:
            assert call(channel, service, method) == grpc.StatusCode.PERMISSION_DENIED, method.name


@pytest.mark.parametrize("name,service,method", list(every_method()), ids=lambda v: getattr(v, "name", v))
def test_wrong_role_is_permission_denied(harness, name, service, method):
    allowed = roles_by_method([service])[f"/{service.full_name}/{method.name}"]
    wrong = next(r for r in ROLES if r not in allowed)
    with connect(harness.running[name].address, ROLE_TOKENS[wrong]) as channel:
        assert call(channel, service, method) == grpc.StatusCode.PERMISSION_DENIED
    right = next(iter(sorted(allowed)))
    with connect(harness.running[name].address, ROLE_TOKENS[right]) as channel:
        assert call(channel, service, method) not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def test_a_tenant_bound_principal_cannot_act_for_another_tenant(harness):
    address = harness.running["mfa"].address
    with connect(address, "token-bank-a") as channel:
        get = channel.unary_unary(
            "/biogate.v1.MfaService/GetConsent",
            request_serializer=common_pb2.GetConsentRequest.SerializeToString,
            response_deserializer=common_pb2.GetConsentResponse.FromString,
        )
        get(common_pb2.GetConsentRequest(subject=common_pb2.SubjectRef(tenant_id="bank-a", subject_id="c-1")))
        with pytest.raises(grpc.RpcError) as err:
            get(common_pb2.GetConsentRequest(subject=common_pb2.SubjectRef(tenant_id="bank-b", subject_id="c-1")))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details_of(err.value)["reason"] == "TENANT_NOT_ALLOWED"


def test_a_request_id_is_echoed(harness):
    with connect(harness.running["mfa"].address, ROLE_TOKENS["auditor"]) as channel:
        get = channel.unary_unary(
            "/biogate.v1.MfaService/GetConsent",
            request_serializer=common_pb2.GetConsentRequest.SerializeToString,
            response_deserializer=common_pb2.GetConsentResponse.FromString,
        )
        _, call_ = get.with_call(
            common_pb2.GetConsentRequest(subject=common_pb2.SubjectRef(tenant_id="t", subject_id="s")),
            metadata=(("x-request-id", "req-abc-123"),),
        )
    assert ("x-request-id", "req-abc-123") in call_.initial_metadata()


def test_an_oversized_message_is_refused(harness):
    limit = harness.settings.server.max_message_bytes
    big = common_pb2.RecordConsentRequest(consent=common_pb2.Consent(evidence_ref="x" * (limit + 1)))
    with connect(harness.running["mfa"].address, ROLE_TOKENS["enroller"], max_message_bytes=2 * limit) as channel:
        record = channel.unary_unary(
            "/biogate.v1.MfaService/RecordConsent",
            request_serializer=common_pb2.RecordConsentRequest.SerializeToString,
            response_deserializer=common_pb2.RecordConsentResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            record(big)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("host,refused", [("0.0.0.0", True), ("::", True), ("10.1.2.3", True),
                                          ("mfa.bank-a.internal", True), ("127.0.0.1", False), ("localhost", False)])
def test_development_credentials_never_serve_beyond_this_machine(tmp_path, host, refused):
    """With no principals every role's token sits in a file, for any tenant: a server that others can
    reach must name its principals. It refused nothing and listened wherever `host` said."""
    from services.common.server.bootstrap import RunningServer
    from services.mfa.server import definition

    settings = make_settings(tmp_path / "data", server={"mfa": {"host": host, "port": 0}},
                             clients={"face": {"target": "127.0.0.1:9"}, "voice": {"target": "127.0.0.1:9"}})
    service = definition(settings)
    try:
        if refused:
            with pytest.raises(ValueError, match=f"listens on {host}, beyond this machine, with development credentials"):
                RunningServer(settings, service, port=0)
        else:
            RunningServer(settings, service, port=0).stop(grace=0)
    finally:
        service.close()
    named = make_settings(tmp_path / "named", auth={"dev_credentials": False, "principals": [
        {"name": "bank", "roles": ["orchestrator"], "token_sha256": token_sha256("t")}]})
    refuse_dev_credentials_off_loopback(named, host, "the mfa service")  # principals named: anywhere
