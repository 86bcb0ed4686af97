"""Standard token verification: the MFA's HTTP endpoint serves the decision tokens' JWKS and an
OpenID-style discovery document; a relying party verifies an ALLOW token with PyJWT's PyJWKClient
and the URL alone. No other outcome is a token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.api.v1 import mfa_pb2 as F
from services.common.api.v1 import mfa_pb2_grpc
from services.common.crypto.signing import public_jwk
from services.mfa.tokens import TokenIssuer, verify_token
from tests.conftest import ServiceHarness
from tests.mfa.conftest import App, outbox_codes, settings_for, setup_subject, subject


@pytest.fixture(scope="module")
def mfa(tmp_path_factory):
    harness = ServiceHarness(settings_for(tmp_path_factory.mktemp("jwks")))
    harness.start("mfa")
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def stub(mfa):
    with mfa.channel("mfa", "dev-all") as channel:
        yield mfa_pb2_grpc.MfaServiceStub(channel)


def base_url(harness: ServiceHarness) -> str:
    return harness.running["mfa"].definition.details["jwks_uri"].removesuffix("/.well-known/jwks.json")


def get(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def start(stub, sid: str, phone: str):
    ref = setup_subject(stub, subject(sid=sid), phone=phone)
    return stub.StartAuthentication(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login",
                                                                 device=App().device))


def otp(stub, settings, session_id: str, wrong: int = 0):
    """Sends one code; submits it, or ``wrong`` times a wrong one."""
    stub.SendOtp(F.SendOtpRequest(session_id=session_id))
    code = outbox_codes(settings)[-1]
    bad = f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"
    return [stub.SubmitFactor(F.SubmitFactorRequest(session_id=session_id, otp=F.OtpEvidence(code=bad if wrong else code)))
            for _ in range(max(1, wrong))][-1]


def test_the_discovery_document_names_the_issuer_the_keys_and_the_algorithm(mfa, stub):
    status, headers, body = get(base_url(mfa) + "/.well-known/openid-configuration")
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["issuer"] == mfa.settings.mfa.issuer
    assert doc["jwks_uri"] == base_url(mfa) + "/.well-known/jwks.json"
    assert doc["id_token_signing_alg_values_supported"] == ["EdDSA", "ES256"]
    assert doc["decision_values_supported"] == ["allow"]
    status, headers, body = get(doc["jwks_uri"])
    assert status == 200 and "max-age" in headers["Cache-Control"]
    assert json.loads(body) == json.loads(stub.GetSigningKeys(F.GetSigningKeysRequest()).jwks_json)
    assert all("d" not in k for k in json.loads(body)["keys"])  # public keys only
    assert get(base_url(mfa) + "/.well-known/other")[0] == 404
    assert get(doc["jwks_uri"], method="POST")[0] == 405


def test_an_allow_token_verifies_with_pyjwt_from_the_url(mfa, stub):
    s = start(stub, "cust-jwks-1", "+8613800135001")
    assert otp(stub, mfa.settings, s.session_id).result.passed
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_ALLOW and d.token
    client = jwt.PyJWKClient(base_url(mfa) + "/.well-known/jwks.json")
    key = client.get_signing_key_from_jwt(d.token)
    claims = jwt.decode(d.token, key.key, algorithms=["EdDSA"], audience="otp-bank", issuer=mfa.settings.mfa.issuer)
    assert (claims["decision"], claims["sid"], claims["act"]) == ("allow", s.session_id, "login")
    discovered = json.loads(get(base_url(mfa) + "/.well-known/openid-configuration")[2])
    assert set(claims) <= set(discovered["claims_supported"])
    with pytest.raises(jwt.InvalidAudienceError):  # another bank's relying party does not take it
        jwt.decode(d.token, key.key, algorithms=["EdDSA"], audience="other-bank", issuer=mfa.settings.mfa.issuer)
    # a key rotated in is served at once; the old key still verifies the tokens it signed
    new_kid = signing_keys(mfa).rotate()
    fresh = jwt.PyJWKClient(base_url(mfa) + "/.well-known/jwks.json")
    assert {k.key_id for k in fresh.get_signing_keys()} >= {new_kid, jwt.get_unverified_header(d.token)["kid"]}
    assert jwt.decode(d.token, fresh.get_signing_key_from_jwt(d.token).key, algorithms=["EdDSA"],
                      audience="otp-bank", issuer=mfa.settings.mfa.issuer)["sid"] == s.session_id


def signing_keys(harness: ServiceHarness):
    from services.mfa.tokens import SigningKeys

    return SigningKeys.from_settings(harness.settings)  # the same vault file the server reads


def test_a_step_up_or_a_deny_is_no_token(mfa, stub):
    s = start(stub, "cust-jwks-2", "+8613800135002")
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_STEP_UP and d.token == ""
    assert otp(stub, mfa.settings, s.session_id, wrong=5).attempts_left == 0
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_DENY and d.token == ""
    assert [r.code for r in d.reasons] == ["SUBJECT_LOCKED"]


def test_the_issuer_signs_only_an_allow_and_verification_refuses_any_other_decision():
    key = Ed25519PrivateKey.generate()
    jwks = json.dumps({"keys": [public_jwk(key.public_key(), "k1")]})
    claims = {"iss": "biogate-mfa", "aud": "bank", "sub": "ps1_x", "sid": "ses_1", "iat": 1, "exp": 2**40}
    for decision in ("deny", "review", "step_up"):
        with pytest.raises(ValueError, match="ALLOW only"):
            TokenIssuer(None, "biogate-mfa", 120).issue({**claims, "decision": decision})  # type: ignore[arg-type]
        # signed by a trusted key all the same (an older release, a bug): still not a credential
        forged = jwt.encode({**claims, "decision": decision}, key, algorithm="EdDSA", headers={"kid": "k1"})
        with pytest.raises(jwt.InvalidTokenError, match="not 'allow'"):
            verify_token(forged, jwks, "biogate-mfa", "bank")
    allowed = jwt.encode({**claims, "decision": "allow"}, key, algorithm="EdDSA", headers={"kid": "k1"})
    assert verify_token(allowed, jwks, "biogate-mfa", "bank")["decision"] == "allow"


def test_the_endpoint_starts_and_stops_with_the_mfa_and_a_taken_port_stops_the_start(mfa, tmp_path):
    port = int(base_url(mfa).rsplit(":", 1)[1])
    (tmp_path / "clash").mkdir()
    (tmp_path / "other").mkdir()
    clash = ServiceHarness(settings_for(tmp_path / "clash", http={"port": port}))
    with pytest.raises(OSError, match="mfa.http.port"):
        clash.start("mfa")
    other = ServiceHarness(settings_for(tmp_path / "other"))
    other.start("mfa")
    url = base_url(other) + "/.well-known/jwks.json"
    assert get(url)[0] == 200
    other.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    (tmp_path / "off").mkdir()
    off = ServiceHarness(settings_for(tmp_path / "off", http={"enabled": False}))
    off.start("mfa")
    try:
        assert "jwks_uri" not in off.running["mfa"].definition.details
    finally:
        off.stop()


def test_behind_a_proxy_the_discovery_names_the_public_url():
    from services.mfa.config import HttpConfig
    from services.mfa.tokens import ALGORITHMS
    from services.mfa.wellknown import WellKnownServer, discovery

    server = WellKnownServer(HttpConfig(public_url="https://mfa.bank-a.example/"), None, "iss")  # type: ignore[arg-type]
    assert discovery("iss", server.base_url, ALGORITHMS)["jwks_uri"] == "https://mfa.bank-a.example/.well-known/jwks.json"


def trickled_until_closed(url: str, liveness_s: float = 30.0) -> bool:
    """Whether the server closed a connection that sends a request head a byte at a time (each byte
    well inside any per-read timeout) before ``liveness_s``; False: it was still held."""
    import socket
    import time
    from urllib.parse import urlsplit

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=5) as sock:
        sock.sendall(b"GET " + where.path.encode() + b" HTTP/1.1\r\nX-Slow: ")
        sock.settimeout(0.1)
        give_up = time.monotonic() + liveness_s
        while time.monotonic() < give_up:
            try:
                sock.sendall(b"a")
                if sock.recv(4096) == b"":
                    return True
            except TimeoutError:
                continue
            except OSError:  # reset: closed too
                return True
    return False


def test_slow_clients_are_cut_off_by_the_jwks_and_metrics_endpoints(mfa, monkeypatch):
    """Both are stdlib threaded servers: a thread per connection, held for as long as a client kept
    sending a byte now and then (or nothing at all): enough connections took every thread the
    process could start. Each connection is now held CONNECTION_S in all."""
    from services.common import metrics

    monkeypatch.setattr(metrics, "CONNECTION_S", 1.0, raising=False)
    server = metrics.serve_metrics("127.0.0.1", 0)
    try:
        assert trickled_until_closed(base_url(mfa) + "/.well-known/jwks.json")
        assert trickled_until_closed(f"http://127.0.0.1:{server.server_port}/metrics")
        assert get(base_url(mfa) + "/.well-known/jwks.json")[0] == 200  # a prompt client is served as before
    finally:
        server.shutdown()
        server.server_close()
