"""mTLS for real: each service on TLS with client certificates required, callers identified by the
certificate's SPIFFE URI or DNS SAN (the CN only without SANs), unknown and expired certificates
refused by the handshake, and the rule for a call carrying both a certificate and a token (the
certificate identifies the workload; a token must belong to the same principal)."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.common.api.v1 import common_pb2, face_pb2_grpc, mfa_pb2_grpc, voice_pb2_grpc
from services.common.client import connect
from services.common.errors import details_of
from services.common.server.bootstrap import RunningServer
from services.mfa.clients import ClientConfigError
from services.serve import definition
from tests.certs import TestCa
from tests.conftest import health_check, make_settings
from tests.mfa.conftest import DEAD

SPIFFE = "spiffe://bank-a.internal/ns/core-banking/sa/login"
SPIFFE_MFA = "spiffe://bank-a.internal/ns/biogate/sa/biogate-mfa"
TOKEN = "branch-onboarding-token-3b9f"
SUBJECT = common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = TestCa(folder / "ca"), TestCa(folder / "rogue", "Rogue CA")
    return {
        "ca": ca,
        "server": ca.server(),
        "spiffe": ca.issue("spiffe", "ignored-cn", uris=(SPIFFE,)),
        "mfa": ca.issue("mfa", "ignored-cn", uris=(SPIFFE_MFA,)),
        "dns": ca.issue("dns", "ignored-cn", dns=("secops.bank-a.internal",)),
        "cn_only": ca.issue("cn", "legacy-batch.bank-a.internal"),
        # SANs present: its CN, although a principal's name, is no identity
        "cn_beside_san": ca.issue("cnsan", "legacy-batch.bank-a.internal", dns=("unknown.bank-a.internal",)),
        "member": ca.issue("member", "member", dns=("teller-ws-17.bank-a.internal",)),  # in the PKI, no principal
        "expired": ca.issue("expired", "x", uris=(SPIFFE,), expired=True),
        "rogue": rogue.issue("rogue", "x", uris=(SPIFFE,)),
    }


def settings_for(tmp_path, pki, face_client=None):
    return make_settings(
        tmp_path / "data",
        server={"tls": {"cert_file": str(pki["server"].cert), "key_file": str(pki["server"].key),
                        "client_ca_file": str(pki["ca"].cert_file)},
                "face": {"port": 0, "health_port": 0}, "voice": {"port": 0, "health_port": 0},
                "mfa": {"port": 0, "health_port": 0}},
        auth={"dev_credentials": False, "principals": [
            {"name": "core-banking-login", "roles": ["auditor", "orchestrator"], "tenants": ["bank-a"],
             "cert_subject": SPIFFE},
            {"name": "security-operations", "roles": ["auditor"], "cert_subject": "secops.bank-a.internal"},
            {"name": "biogate-mfa", "roles": ["service"], "cert_subject": SPIFFE_MFA},
            {"name": "legacy-batch", "roles": ["auditor"], "cert_subject": "legacy-batch.bank-a.internal"},
            {"name": "branch-onboarding", "roles": ["enroller"], "tenants": ["bank-a"],
             "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()},
        ]},
        clients={"face": face_client or {"target": DEAD, "retries": 0}, "voice": {"target": DEAD, "retries": 0}},
    )


# One authorised, model-free call per service (auditor and enroller may read an enrolment or a consent).
CALLS = {
    "face": lambda ch: face_pb2_grpc.FaceServiceStub(ch).GetEnrollment(
        common_pb2.GetEnrollmentRequest(subject=SUBJECT), timeout=10),
    "voice": lambda ch: voice_pb2_grpc.VoiceServiceStub(ch).GetEnrollment(
        common_pb2.GetEnrollmentRequest(subject=SUBJECT), timeout=10),
    "mfa": lambda ch: mfa_pb2_grpc.MfaServiceStub(ch).GetConsent(
        common_pb2.GetConsentRequest(subject=SUBJECT), timeout=10),
}


@pytest.fixture(scope="module", params=["face", "voice", "mfa"])
def server(request, tmp_path_factory, pki):
    settings = settings_for(tmp_path_factory.mktemp(request.param), pki)
    running = RunningServer(settings, definition(settings, request.param))
    running.server.start()  # authentication needs no models; the warm-up is not started
    assert running.health_server is not None
    running.health_server.start()
    yield request.param, running
    running.stop(grace=0)


def call(pki, server, who: str | None, token: str | None = None):
    name, running = server
    issued = pki[who] if who else None
    with connect(running.address, token, ca_file=pki["ca"].cert_file,
                 cert_file=issued.cert if issued else None, key_file=issued.key if issued else None) as ch:
        try:
            CALLS[name](ch)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                return "authorised"  # the handler ran: nothing enrolled or consented for cust-1
            return err.code().name, details_of(err)["reason"]
    return "authorised"


def test_callers_are_identified_by_the_san_and_by_the_cn_only_without_sans(pki, server):
    assert call(pki, server, "spiffe") == "authorised"
    assert call(pki, server, "dns") == "authorised"
    assert call(pki, server, "cn_only") == "authorised"
    assert call(pki, server, "cn_beside_san") == ("UNAUTHENTICATED", "UNAUTHENTICATED")
    assert call(pki, server, "member") == ("UNAUTHENTICATED", "UNAUTHENTICATED")


def test_unknown_expired_and_missing_certificates_fail_the_handshake(pki, server):
    for who in ("expired", "rogue", None):
        assert call(pki, server, who) == ("UNAVAILABLE", ""), who


def test_a_token_on_an_mtls_connection_must_belong_to_the_certificates_principal(pki, server):
    # a certificate of a principal plus another principal's token: refused, whichever has more rights
    assert call(pki, server, "spiffe", TOKEN) == ("UNAUTHENTICATED", "CERTIFICATE_TOKEN_MISMATCH")
    assert call(pki, server, "dns", "no-such-token") == ("UNAUTHENTICATED", "CERTIFICATE_TOKEN_MISMATCH")
    # a PKI member's certificate without a principal only protects the transport: the token identifies
    assert call(pki, server, "member", TOKEN) == "authorised"
    assert call(pki, server, "member", "no-such-token") == ("UNAUTHENTICATED", "UNAUTHENTICATED")


def test_health_answers_in_plaintext_on_the_health_port_only(pki, server):
    _, running = server
    with grpc.insecure_channel(running.health_address) as ch:
        reply = health_check(ch)(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # the models were never loaded
        with pytest.raises(grpc.RpcError) as err:
            CALLS[server[0]](ch)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there
    with grpc.insecure_channel(running.address) as ch:  # the service port speaks TLS only
        with pytest.raises(grpc.RpcError) as err:
            health_check(ch)(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mfa_refuses_to_start_when_a_biometric_service_refuses_its_credentials(pki, tmp_path):
    face_settings = settings_for(tmp_path / "face", pki)
    face = RunningServer(face_settings, definition(face_settings, "face"))
    face.server.start()
    try:
        base = {"target": face.address, "ca_file": str(pki["ca"].cert_file), "retries": 0}
        # no principal; a principal without the service role; the bank's login system (orchestrator)
        for who in ("member", "dns", "spiffe"):
            client = {**base, "cert_file": str(pki[who].cert), "key_file": str(pki[who].key)}
            with pytest.raises(ClientConfigError) as err:
                definition(settings_for(tmp_path / who, pki, client), "mfa")
            assert "clients.face.cert_file/clients.face.key_file" in str(err.value)
            assert "refuses this MFA's credentials" in str(err.value)
        client = {**base, "cert_file": str(pki["mfa"].cert), "key_file": str(pki["mfa"].key)}
        definition(settings_for(tmp_path / "good", pki, client), "mfa").close()  # the MFA's own: it starts
    finally:
        face.stop(grace=0)
