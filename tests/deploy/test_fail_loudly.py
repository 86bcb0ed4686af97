"""At run time a biometric service refusing the MFA's credentials is a configuration error: the call
fails with a status naming the setting, a metric counts it and the breaker stays closed; the
session is never quietly degraded."""

from __future__ import annotations

import json

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.api.v1 import face_pb2, face_pb2_grpc
from services.mfa.config import ClientTarget
from services.common.errors import ServiceError
from services.common.server.bootstrap import RunningServer
from services.mfa.clients import BiometricClient, ClientConfigError
from services.serve import definition
from tests.conftest import make_settings


def refused_count(code: str) -> float:
    return REGISTRY.get_sample_value("biogate_mfa_client_config_errors_total", {"service": "face", "code": code}) or 0.0


@pytest.fixture
def face(tmp_path):
    settings = make_settings(tmp_path / "data", server={"face": {"port": 0}})
    running = RunningServer(settings, definition(settings, "face"))
    running.server.start()  # authentication needs no models
    yield running
    running.stop(grace=0)


def client(face, token: str) -> BiometricClient:
    return BiometricClient("face", face.address, token, ClientTarget(retries=0, breaker_failures=1),
                           face_pb2_grpc.FaceServiceStub, 1 << 20)


def test_refused_credentials_are_a_configuration_error_not_an_outage(face):
    dev = json.loads(face.settings.dev_credentials_file.read_text())
    # the bank's own systems (orchestrator) call the MFA; only the MFA's role (service) calls face and voice
    for token, code in (("not-a-known-token", "UNAUTHENTICATED"), (dev["dev-auditor"], "PERMISSION_DENIED"),
                        (dev["dev-orchestrator"], "PERMISSION_DENIED")):
        c = client(face, token)
        before = refused_count(code)
        with pytest.raises(ServiceError) as err:
            c.call("Verify", face_pb2.VerifyFaceRequest(), idempotent=True)
        assert err.value.code == grpc.StatusCode.INTERNAL and err.value.reason == "BIOMETRIC_CREDENTIALS_REFUSED"
        assert "clients.face.token" in err.value.message
        assert refused_count(code) == before + 1
        assert c.available and c.breaker.state == "closed"  # one failure would have opened it (breaker_failures=1)
        with pytest.raises(ClientConfigError, match="clients.face.token"):
            c.check_credentials()
        c.close()
    good = client(face, dev["dev-service"])
    good.check_credentials()  # accepted: the empty request is refused as INVALID_ARGUMENT, nothing written
    good.close()
