"""Guessed or forged evidence: an LLR the face service never issued, a decision token whose claims
were edited, and a tenant policy that names a calibration channel (the way the MFA once credited a
guessed LLR)."""

from __future__ import annotations

import base64
import json
import logging
from concurrent import futures

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc
from services.common.errors import details_of
from services.mfa.policy import PolicyError, load_policy
from services.mfa.tokens import verify_token
from tests.certs import TestCa
from tests.conftest import ServiceHarness, make_settings
from tests.mfa.conftest import DEAD, App, outbox_codes, setup_subject, subject
from tests.mfa.world import FIX

pytestmark = pytest.mark.attacks
F = mfa_pb2
PHOTO = (FIX / "face" / "identities" / "Aaron_Peirsol" / "Aaron_Peirsol_0003.jpg").read_bytes()


class VouchingFace(face_pb2_grpc.FaceServiceServicer):
    """A stand-in for the face service that vouches for every photo: a match, live, LLR +10."""

    def __init__(self) -> None:
        self.photos: list[bytes] = []  # what reached it (the MFA's start-up probe sends none)

    def Verify(self, request, context):
        self.photos.append(request.image.data)
        return face_pb2.VerifyFaceResponse(match=True, score=0.99, threshold=0.3, llr=10.0, model_id="forged",
                                           liveness_checked=True, live=True, target_fmr=1e-4)


def _serve(servicer, issued):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    face_pb2_grpc.add_FaceServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(issued.key.read_bytes(), issued.cert.read_bytes())]))
    server.start()
    return server, f"localhost:{port}"


def _login_with_face(settings):
    """A login on a new device: the photo signed by the attacker's own key, then the SMS code."""
    h = ServiceHarness(settings)
    h.start("mfa")
    try:
        with h.channel("mfa") as ch:
            stub = mfa_pb2_grpc.MfaServiceStub(ch)
            ref = setup_subject(stub, subject("bank-forged", "cust-1"))
            app = App()
            req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device)
            s = app.opened(req, stub.StartAuthentication(req))
            r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=app.face(s, PHOTO)), timeout=30)
            stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
            stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(
                code=outbox_codes(settings)[-1])))
            d = stub.Decide(F.DecideRequest(session_id=s.session_id))
            jwks = stub.GetSigningKeys(F.GetSigningKeysRequest()).jwks_json
            return r.result, d, jwks
    finally:
        h.stop()


def test_a_forged_llr_from_an_unauthenticated_face_service_is_no_evidence(tmp_path):
    """An attacker answers in the face service's place (a hijacked address) with match, live and
    LLR +10 for any photo. The MFA reaches its face service over TLS pinned to the deployment's CA:
    the stand-in's certificate is refused, its answer never read, no LLR credited, no ALLOW. The
    same stand-in with a certificate of the deployment's CA would be believed (the control below):
    what an authenticated face service says is the evidence, so its key must be kept as a secret."""
    deployment, attacker = TestCa(tmp_path / "ca"), TestCa(tmp_path / "evil", "Attacker CA")
    forged = VouchingFace()
    for ca, issued_by, expect_allow in ((deployment, attacker, False), (attacker, attacker, True)):
        server, target = _serve(forged, issued_by.server(f"face-{len(str(expect_allow))}"))
        try:
            settings = make_settings(tmp_path / f"data-{expect_allow}", clients={
                "face": {"target": target, "ca_file": str(ca.cert_file), "retries": 0, "deadline_s": 3,
                         "breaker_failures": 5},
                "voice": {"target": DEAD, "retries": 0, "deadline_s": 2}})
            forged.photos.clear()
            result, d, jwks = _login_with_face(settings)
        finally:
            server.stop(0)
        if expect_allow:  # control: the same answer from a server the MFA authenticates counts
            assert result.passed and result.llr == pytest.approx(10.0) and PHOTO in forged.photos, result
            assert d.outcome == F.OUTCOME_ALLOW, d
            allowed = (d.token, jwks, settings.mfa.issuer)
            continue
        assert PHOTO not in forged.photos, "the MFA sent the capture to a server it could not authenticate"
        assert (result.passed, result.llr) == (False, 0.0), result
        assert [r.code for r in result.reasons] == ["FACE_SERVICE_UNAVAILABLE"], result
        assert d.outcome != F.OUTCOME_ALLOW and "face" not in d.amr, d
        assert d.token == "", "only an ALLOW is a bearer credential"
    _edited_tokens_are_refused(*allowed)


def _edited_tokens_are_refused(token: str, jwks: str, issuer: str) -> None:
    """The relying party's side: an ALLOW's token with its factors, evidence and amount edited."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    audience = claims["aud"]
    verify_token(token, jwks, issuer, audience)  # the MFA's own token verifies
    claims.update(amr=["face", "sms"], acr="aal3", amt="CNY 1000000.00",
                  fac=[{"f": "face", "llr": 10.0, "bind": "device"}, {"f": "sms_otp", "llr": 3.0}])

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    kid = jwt.get_unverified_header(token)["kid"]
    edited = b64(json.dumps(claims).encode())
    forgeries = {
        "original signature": f"{header}.{edited}.{signature}",
        "unsigned": jwt.encode(claims, None, algorithm="none", headers={"kid": kid}),  # type: ignore[arg-type]  # alg none: no key
        "attacker's key": jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid}),
        "HMAC with the public key": f"{b64(json.dumps({'alg': 'HS256', 'kid': kid}).encode())}.{edited}.{signature}",
    }
    for name, forged in forgeries.items():
        with pytest.raises(jwt.InvalidTokenError):
            verify_token(forged, jwks, issuer, audience)
            pytest.fail(f"the {name} forgery verified")


OLD_KEYS = {  # the field, and the line naming channels that models/manifest.yaml does not have
    "factors.face.calibration_channel": ("  face:\n", "    calibration_channel: mobile-selfie\n"),
    "factors.voice.calibration_channels": ("  voice:\n", "    calibration_channels: {wideband: mobile-16k}\n"),
}


@pytest.mark.parametrize("field", list(OLD_KEYS))
def test_a_policy_naming_an_unknown_calibration_channel_is_refused_at_load(world, tmp_path, caplog, field):
    """The default policy once named channels (mobile-selfie, mobile-16k) the model manifest did
    not have, and the MFA credited a guessed LLR. A tenant policy naming one is refused when the
    running MFA loads it, with the field named in its log, and the tenant's sessions fail closed
    (never the default policy's decisions in its place); as the default policy it is refused too."""
    from services.common.config import PROJECT_ROOT

    default = (PROJECT_ROOT / "services" / "mfa" / "policies" / "default.yaml").read_text()
    section, line = OLD_KEYS[field]
    text = default.replace(section, section + line, 1)
    assert line in text
    tenant = f"bank-calib-{field.split('.')[1]}"
    settings = world.mfa.settings
    policy_dir = settings.mfa.policy_dir or settings.data_dir / "policies"
    policy_dir.mkdir(parents=True, exist_ok=True)
    (policy_dir / f"{tenant}.yaml").write_text(text)
    with caplog.at_level(logging.ERROR, logger="biogate.mfa.policy"):
        with pytest.raises(grpc.RpcError) as err:
            world.start(common_pb2.SubjectRef(tenant_id=tenant, subject_id="cust-1"), App())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "POLICY_INVALID"
    logged = [p for r in caplog.records for p in getattr(r, "problems", [])]
    assert any(field in p and "remove the key" in p for p in logged), logged
    (tmp_path / "default.yaml").write_text(text)
    with pytest.raises(PolicyError) as refused:
        load_policy(tmp_path / "default.yaml")
    assert f"{field}: no longer a policy key" in str(refused.value)
