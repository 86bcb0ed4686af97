"""The SDK's MFA flows, typed errors and decision-token verification against a real MFA server
(policies without biometrics: SMS code and bound devices)."""

from __future__ import annotations

import itertools
import json

import grpc
import jwt
import pytest

from biogate_client import (
    BioGate, Credentials, Device, InvalidArgument, device_info, PermissionDenied, Unauthenticated, dev_credentials, dev_otp,
    outcome_name, transaction_context,
)
from services.common.api.v1 import mfa_pb2
from biogate_client import webauthn
from services.mfa import binding

_ids = itertools.count(1)


def customer(env, tenant: str = "otp-bank") -> str:
    sid = f"sdk-cust-{next(_ids):04d}"
    env.client.record_consent(tenant, sid)
    env.client.set_phone(tenant, sid, f"+86138001{next(_ids):05d}")
    return sid


def otp_login(env, tenant: str, sid: str, device: Device, **kw):
    s = env.client.start(tenant, sid, device, **kw)
    sent = s.send_otp()
    assert s.submit_otp(dev_otp(env.outbox, sent.masked_phone)).passed
    return s, s.decide()


@pytest.mark.parametrize("amount, payee", [(None, None), (("CNY", 490000), {"name": "李雷 Li", "account": "6222 **** 1234"})])
def test_the_sdk_builds_the_transaction_context_the_mfa_checks(amount, payee):
    fields = dict(session_id="s-1", nonce="n-1", tenant="bank-a", action="payment" if payee else "login",
                  amount=amount, payee=payee, evidence=["ab" * 32, "cd" * 32])
    assert transaction_context(**fields) == binding.transaction_context(**fields)


def test_an_otp_login_through_the_sdk_is_allowed_and_its_token_verifies(mfa_only):
    sid = customer(mfa_only)
    s, d = otp_login(mfa_only, "otp-bank", sid, Device())
    assert outcome_name(d.outcome) == "ALLOW" and d.token
    claims = mfa_only.client.verify_token(d.token, "otp-bank", session_id=s.id)
    assert claims["sid"] == s.id and claims["aud"] == "otp-bank" and claims["decision"] == "allow"
    with pytest.raises(jwt.InvalidAudienceError):
        mfa_only.client.verify_token(d.token, "bind-bank", s.id)
    with pytest.raises(jwt.InvalidTokenError):
        mfa_only.client.verify_token(d.token, "otp-bank", session_id="another-session")
    with pytest.raises(jwt.InvalidTokenError, match="decides another session"):
        mfa_only.client.verify_token(d.token, "otp-bank", "")
    assert mfa_only.client.verify_token(d.token, "otp-bank", s.id, action="login")["act"] == "login"
    with pytest.raises(jwt.InvalidTokenError, match="not 'payment'"):  # a login's ALLOW is no payment's
        mfa_only.client.verify_token(d.token, "otp-bank", s.id, action="payment")
    with pytest.raises(jwt.InvalidTokenError, match="another amount"):
        mfa_only.client.verify_token(d.token, "otp-bank", s.id, amount=("CNY", 100))
    head, body, sig = d.token.split(".")
    forged = json.loads(jwt.utils.base64url_decode(body))
    forged["decision"] = "deny"
    tampered = ".".join([head, jwt.utils.base64url_encode(json.dumps(forged).encode()).decode(), sig])
    with pytest.raises(jwt.InvalidSignatureError):
        mfa_only.client.verify_token(tampered, "otp-bank", s.id)


def test_a_token_verifies_against_the_mfa_s_jwks_over_http_or_a_jwks_given_as_text(mfa_only):
    sid = customer(mfa_only)
    s, d = otp_login(mfa_only, "otp-bank", sid, Device())
    url = mfa_only.harness.running["mfa"].definition.details["jwks_uri"]  # the MFA's /.well-known/jwks.json
    assert url.startswith("http://127.0.0.1:") and url.endswith("/.well-known/jwks.json")
    assert mfa_only.client.verify_token(d.token, "otp-bank", s.id, jwks=url)["decision"] == "allow"
    jwks = mfa_only.client.signing_keys()
    assert mfa_only.client.verify_token(d.token, "otp-bank", s.id, jwks=json.dumps(jwks))["decision"] == "allow"
    other_kid = {"keys": [{**k, "kid": k["kid"] + "-other"} for k in jwks["keys"]]}
    unknown: dict[str, list]
    for unknown in (other_kid, {"keys": []}):
        with pytest.raises(jwt.InvalidKeyError):
            mfa_only.client.verify_token(d.token, "otp-bank", s.id, jwks=unknown)
    with pytest.raises(jwt.InvalidIssuerError):
        mfa_only.client.verify_token(d.token, "otp-bank", s.id, issuer="another-mfa")


def test_a_device_bound_after_a_login_proves_itself_in_the_next_session(mfa_only):
    sid = customer(mfa_only, "bind-bank")
    phone = Device(ec=True)
    s, d = otp_login(mfa_only, "bind-bank", sid, phone)
    assert d.outcome == mfa_pb2.OUTCOME_ALLOW
    device_id = s.register_device("my phone")
    assert phone.device_id == device_id
    assert [x.device_id for x in mfa_only.client.list_devices("bind-bank", sid)] == [device_id]
    s = mfa_only.client.start("bind-bank", sid, phone)
    assert s.started.device_bound
    r = s.submit_device()
    assert r.passed and r.binding == "device", r
    assert s.decide().outcome == mfa_pb2.OUTCOME_ALLOW
    other = Device(phone.device, device_id=device_id)  # the phone's id and attributes without its key
    other.shown = phone.shown
    s = mfa_only.client.start("bind-bank", sid, other)
    r = s.submit_device()
    assert not r.passed and "DEVICE_SIGNATURE_INVALID" in [x.code for x in r.reasons], r


def test_a_device_key_saved_and_loaded_signs_as_before(tmp_path):
    phone = Device(device_id="dev-1")
    phone.save(tmp_path / "key.pem")
    again = Device.load(tmp_path / "key.pem")
    assert again.public_der == phone.public_der and again.device_id == "dev-1"
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600


def test_a_fraud_phrase_goes_to_review_and_a_reviewer_resolves_it(mfa_only):
    sid, phone = customer(mfa_only), Device()
    s, _ = otp_login(mfa_only, "otp-bank", sid, phone)
    s.register_device()
    s = mfa_only.client.start("otp-bank", sid, phone, conversation_text="please move it to a safe account now")
    assert [f for fs in s.started.acceptable for f in fs.factors] == [mfa_pb2.FACTOR_TYPE_DEVICE, mfa_pb2.FACTOR_TYPE_SMS_OTP]
    assert s.submit_device().passed
    assert s.submit_otp(dev_otp(mfa_only.outbox, s.send_otp().masked_phone)).passed
    d = s.decide()
    assert outcome_name(d.outcome) == "REVIEW" and d.review_id
    pending = mfa_only.client.list_reviews("otp-bank")
    assert d.review_id in [r.review_id for r in pending]
    assert mfa_only.client.get_review(d.review_id).decision.outcome == mfa_pb2.OUTCOME_REVIEW
    done = mfa_only.client.resolve_review(d.review_id, approve=False, note="customer coached")
    assert done.review.status == "rejected" and done.review.resolved_by == "dev-all"
    assert done.decision.outcome == mfa_pb2.OUTCOME_DENY and not done.decision.token
    assert d.review_id not in [r.review_id for r in mfa_only.client.list_reviews("otp-bank")]


def test_refusals_are_typed_exceptions_with_the_server_s_details(mfa_only):
    with pytest.raises(InvalidArgument) as err:
        mfa_only.client.record_consent("otp-bank", "13800135678")
    assert err.value.reason == "PERSONAL_NUMBER_AS_ID" and err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument) as err:
        mfa_only.client.set_phone("otp-bank", customer(mfa_only), "not a number")
    assert err.value.fields and err.value.reason, err.value
    verifier = BioGate(mfa=mfa_only.address, credentials=dev_credentials(
        mfa_only.settings.dev_credentials_file, "dev-verifier"))
    anonymous = BioGate(mfa=mfa_only.address, credentials=Credentials())
    try:
        with pytest.raises(PermissionDenied):
            verifier.record_consent("otp-bank", "sdk-cust-x")
        with pytest.raises(Unauthenticated):
            anonymous.signing_keys()
    finally:
        verifier.close()
        anonymous.close()
    with pytest.raises(KeyError, match="no token for 'dev-nobody'"):
        dev_credentials(mfa_only.settings.dev_credentials_file, "dev-nobody")


def test_a_passkey_registered_and_asserted_through_the_sdk_proves_the_device(mfa_only):
    from tests.mfa.authenticator import SoftAuthenticator, b64url

    sid, browser = customer(mfa_only, "bind-bank"), SoftAuthenticator()
    web = Device(device_info("web-1", platform="web"))  # the browser's attributes; the passkey signs
    s, d = otp_login(mfa_only, "bind-bank", sid, web)
    device_id = s.register_passkey(browser.create(s.webauthn_options()))
    s = mfa_only.client.start("bind-bank", sid, web)
    context = s.context()
    got = browser.get(jwt.utils.base64url_decode(webauthn.assertion_challenge(context)))
    as_json = json.dumps({"id": b64url(got.credential_id), "rawId": b64url(got.credential_id), "type": "public-key",
                          "response": {"clientDataJSON": b64url(got.client_data_json),
                                       "authenticatorData": b64url(got.authenticator_data),
                                       "signature": b64url(got.signature)}})
    r = s.submit_passkey(device_id, as_json)
    assert r.passed and r.binding == "webauthn", r
    assert s.decide().outcome == mfa_pb2.OUTCOME_ALLOW


def test_a_payment_signed_with_its_amount_and_payee_is_allowed_and_another_payee_is_refused(mfa_only):
    sid, phone = customer(mfa_only, "bind-bank"), Device()
    s, _ = otp_login(mfa_only, "bind-bank", sid, phone)
    s.register_device()
    pay = dict(action="payment", amount=("CNY", 120000), payee=("Li Lei", "6222 **** 1234"))
    s = mfa_only.client.start("bind-bank", sid, phone, **pay)
    assert s.submit_device().passed
    assert s.submit_otp(dev_otp(mfa_only.outbox, s.send_otp().masked_phone)).passed
    d = s.decide()
    assert d.outcome == mfa_pb2.OUTCOME_ALLOW, d
    claims = mfa_only.client.verify_token(d.token, "bind-bank", session_id=s.id)
    assert claims["act"] == "payment" and claims["amt"] == {"cur": "CNY", "minor": 120000}, claims
    s = mfa_only.client.start("bind-bank", sid, phone, **pay)
    phone.shown[s.id]["payee"] = {"name": "Mallory", "account": "6222 **** 9999"}  # what a hijacked screen showed
    r = s.submit_device()
    assert not r.passed and "DEVICE_CONTEXT_MISMATCH" in [x.code for x in r.reasons], r


def test_a_correctly_signed_token_that_is_not_an_allow_is_refused():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from biogate_client import verify_decision

    key = Ed25519PrivateKey.generate()
    jwk = {**json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key())), "kid": "k1", "alg": "EdDSA"}
    claims = {"iss": "biogate-mfa", "aud": "bank-a", "sid": "ses_1", "iat": 1, "exp": 4102444800}
    for decision, ok in (("allow", True), ("deny", False), ("review", False)):
        token = jwt.encode({**claims, "decision": decision}, key, algorithm="EdDSA", headers={"kid": "k1"})
        if ok:
            assert verify_decision(token, {"keys": [jwk]}, tenant="bank-a", session_id="ses_1")["decision"] == "allow"
        else:
            with pytest.raises(jwt.InvalidTokenError, match="not 'allow'"):
                verify_decision(token, {"keys": [jwk]}, tenant="bank-a", session_id="ses_1")
    hs256 = jwt.encode({**claims, "decision": "allow"}, "secret" * 6, algorithm="HS256", headers={"kid": "k1"})
    with pytest.raises(jwt.InvalidAlgorithmError):
        verify_decision(hs256, {"keys": [jwk]}, tenant="bank-a", session_id="ses_1")


def test_the_readme_shows_the_login_example_the_tests_run():
    from services.common.config import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text()
    snippet = readme[readme.index("## Client SDK"):].split("```python\n", 1)[1].split("```", 1)[0]
    example = (PROJECT_ROOT / "clients" / "python" / "examples" / "login.py").read_text()
    assert snippet == example.split("\n", 1)[1]  # all but the example's docstring line
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 15
