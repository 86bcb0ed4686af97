"""MFA flows over gRPC on loopback without biometrics (a tenant policy of OTP and device keys):
step-up on a new device, OTP from the development SMS sink, device binding and proof, lockout and
admin unlock, amount bands, fraud-script review and the review queue, degraded mode."""

from __future__ import annotations

import json

import grpc
import jwt
import pytest

from services.common.api.v1 import mfa_pb2
from services.common.errors import details_of
from services.mfa.tokens import verify_token
from tests.mfa.conftest import App, outbox_codes, setup_subject, subject

F = mfa_pb2


def start(stub, app=None, action="login", ref=None, amount=None, text="", channel=F.CHANNEL_APP, payee=None, **ctx):
    """The bank's back end opens a session; the app remembers what it shows the user."""
    app = app or App()
    req = F.StartAuthenticationRequest(subject=ref or subject(), channel=channel, action=action, device=app.device,
                                       context=F.ContextSignals(conversation_text=text, **ctx))
    if amount is not None:
        req.amount.CopyFrom(F.Money(currency="CNY", amount_minor=amount))
    if payee is not None:
        req.payee.CopyFrom(payee)
    return app.opened(req, stub.StartAuthentication(req))


def otp_round(stub, settings, session_id, wrong=False, payee=None):
    stub.SendOtp(F.SendOtpRequest(session_id=session_id, payee=payee))
    code = outbox_codes(settings)[-1]
    if wrong:
        code = f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"
    return stub.SubmitFactor(F.SubmitFactorRequest(session_id=session_id, otp=F.OtpEvidence(code=code)))


def sets(msg_sets):
    return [sorted(F.FactorType.Name(f) for f in s.factors) for s in msg_sets]


def bind(stub, settings, app, ref=None):
    s = start(stub, app, ref=ref)
    otp_round(stub, settings, s.session_id)
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
    app.device_id = stub.RegisterDevice(F.RegisterDeviceRequest(
        session_id=s.session_id, device=app.device, public_key=app.public_der, label="my phone")).device_id
    return app


def test_new_device_steps_up_then_allows_after_the_otp_and_binds(stub, mfa_server):
    settings = mfa_server.settings
    setup_subject(stub)
    app = App()
    s = start(stub, app)
    assert not s.device_bound
    assert sets(s.acceptable) == [["FACTOR_TYPE_SMS_OTP"]]  # an unbound device cannot prove its key
    assert "UNBOUND_DEVICE" in [r.code for r in s.risk.reasons]
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_STEP_UP and sets(d.still_needed) == [["FACTOR_TYPE_SMS_OTP"]]
    sent = stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
    assert sent.masked_phone == "+86 *** **** 5678"
    code = outbox_codes(settings)[-1]
    assert len(code) == 6 and code.isdigit()
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)))
    assert r.result.passed and r.result.llr == pytest.approx(3.0)
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_ALLOW and list(d.amr) == ["sms"] and d.acr == "aal1"
    # the decision is final and idempotent
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).token == d.token
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)))
    assert details_of(err.value)["reason"] == "SESSION_DECIDED"
    # the signed decision verifies with the served JWKS
    jwks = stub.GetSigningKeys(F.GetSigningKeysRequest()).jwks_json
    claims = verify_token(d.token, jwks, settings.mfa.issuer, "otp-bank")
    assert claims["decision"] == "allow" and claims["sid"] == s.session_id
    assert claims["sub"].startswith("ps1_") and "cust-0001" not in json.dumps(claims)
    # bind the device, then log in with a proof of its key
    app.device_id = stub.RegisterDevice(F.RegisterDeviceRequest(
        session_id=s.session_id, device=app.device, public_key=app.public_der, label="my phone")).device_id
    with pytest.raises(grpc.RpcError) as err:  # once per session
        stub.RegisterDevice(F.RegisterDeviceRequest(session_id=s.session_id, device=app.device,
                                                    public_key=app.public_der))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    s2 = start(stub, app)
    assert s2.device_bound and ["FACTOR_TYPE_DEVICE"] in sets(s2.acceptable)
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s2.session_id, device=app.proof(s2)))
    assert r.result.passed
    assert stub.Decide(F.DecideRequest(session_id=s2.session_id)).outcome == F.OUTCOME_ALLOW
    listed = stub.ListDevices(F.ListDevicesRequest(subject=subject())).devices
    assert [d.device_id for d in listed] == [app.device_id] and listed[0].last_seen_at.seconds > 0


def test_a_signature_over_another_session_or_by_another_key_fails(stub, mfa_server):
    setup_subject(stub)
    app = bind(stub, mfa_server.settings, App())
    s = start(stub, app)
    old = start(stub, app)
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(old)))
    assert not r.result.passed and r.result.reasons[0].code == "DEVICE_FOR_OTHER_SESSION"
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(old, send_context=False)))
    assert not r.result.passed and r.result.reasons[0].code == "DEVICE_SIGNATURE_INVALID"
    nonce_only = F.DeviceProof(device_id=app.device_id, signature=app.sign(s.nonce.encode()))  # the old protocol
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=nonce_only))
    assert not r.result.passed and r.result.reasons[0].code == "DEVICE_SIGNATURE_INVALID"
    thief = App(app.device)
    thief.device_id, thief.shown = app.device_id, app.shown
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=thief.proof(s)))
    assert not r.result.passed and r.result.reasons[0].code == "DEVICE_SIGNATURE_INVALID"
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s, send_context=False)))
    assert r.result.passed and r.result.binding == "device"  # without the context the service builds it


def test_an_os_update_keeps_the_device_bound_but_another_model_is_new(stub, mfa_server):
    setup_subject(stub)
    app = bind(stub, mfa_server.settings, App())
    updated = App(mfa_server and App().device)
    updated.device.os_version = "14.3"
    assert start(stub, updated).device_bound
    other = App()
    other.device.model = "Galaxy S24"
    s = start(stub, other)
    assert not s.device_bound and "NEW_DEVICE" in [r.code for r in s.risk.reasons]
    assert app.device_id


def test_five_wrong_otps_lock_the_subject_until_an_admin_unlocks(stub, mfa_server):
    settings = mfa_server.settings
    setup_subject(stub)
    s = start(stub)
    stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
    code = outbox_codes(settings)[-1]
    wrong = f"{(int(code) + 1) % 10 ** 6:06d}"
    lefts = []
    for _ in range(5):
        r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=wrong)))
        assert not r.result.passed and r.result.reasons[0].code == "OTP_WRONG"
        lefts.append(r.attempts_left)
    assert lefts == [4, 3, 2, 1, 0]
    with pytest.raises(grpc.RpcError) as err:  # even the right code is no longer taken
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "SUBJECT_LOCKED"
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "SUBJECT_LOCKED"
    with pytest.raises(grpc.RpcError) as err:
        start(stub)
    assert details_of(err.value)["reason"] == "SUBJECT_LOCKED"
    stub.UnlockSubject(F.UnlockSubjectRequest(subject=subject(), reason="verified-by-phone-call"))
    s = start(stub)
    otp_round(stub, settings, s.session_id)
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW


def test_a_payment_above_the_amount_band_requires_a_second_factor(stub, mfa_server):
    settings = mfa_server.settings
    setup_subject(stub)
    app = bind(stub, settings, App())
    small = start(stub, app, action="payment", amount=100_00)
    assert ["FACTOR_TYPE_DEVICE"] in sets(small.acceptable)
    stub.SubmitFactor(F.SubmitFactorRequest(session_id=small.session_id, device=app.proof(small)))
    assert stub.Decide(F.DecideRequest(session_id=small.session_id)).outcome == F.OUTCOME_ALLOW
    big = start(stub, app, action="payment", amount=20_000_00)
    assert sets(big.acceptable) == [["FACTOR_TYPE_DEVICE", "FACTOR_TYPE_SMS_OTP"]]
    assert "AMOUNT_BAND" in [r.code for r in big.risk.reasons]
    stub.SubmitFactor(F.SubmitFactorRequest(session_id=big.session_id, device=app.proof(big)))
    d = stub.Decide(F.DecideRequest(session_id=big.session_id))
    assert d.outcome == F.OUTCOME_STEP_UP and sets(d.still_needed) == [["FACTOR_TYPE_SMS_OTP"]]
    otp_round(stub, settings, big.session_id)
    d = stub.Decide(F.DecideRequest(session_id=big.session_id))
    assert d.outcome == F.OUTCOME_ALLOW and "mfa" in d.amr
    claims = jwt.decode(d.token, options={"verify_signature": False})
    assert claims["amt"] == {"cur": "CNY", "minor": 20_000_00} and claims["act"] == "payment"


@pytest.mark.parametrize("text", ["对方说要代操作，帮我转到安全账户", "He said to move it to a SAFE  account and install Any Desk",
                                  "please install anydesk"])
def test_a_fraud_script_phrase_raises_risk_and_forces_review(stub, mfa_server, text):
    settings = mfa_server.settings
    setup_subject(stub)
    app = bind(stub, settings, App())
    s = start(stub, app, action="login", text=text)
    assert s.risk.level >= F.RISK_LEVEL_HIGH
    assert "FRAUD_SCRIPT_PHRASE" in [r.code for r in s.risk.reasons]
    assert sets(s.acceptable) == [["FACTOR_TYPE_DEVICE", "FACTOR_TYPE_SMS_OTP"]]  # high risk: two factors
    stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s)))
    otp_round(stub, settings, s.session_id)
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_REVIEW and d.review_id
    assert "FRAUD_SCRIPT_PHRASE" in [r.code for r in d.reasons]
    queue = stub.ListReviews(F.ListReviewsRequest(tenant_id="otp-bank")).reviews
    assert [r.review_id for r in queue] == [d.review_id] and queue[0].session_id == s.session_id
    done = stub.ResolveReview(F.ResolveReviewRequest(review_id=d.review_id, approve=False, note="customer coached"))
    assert done.review.status == "rejected" and done.review.resolved_by == "dev-all"
    with pytest.raises(grpc.RpcError) as err:
        stub.ResolveReview(F.ResolveReviewRequest(review_id=d.review_id, approve=True))
    assert details_of(err.value)["reason"] == "REVIEW_ALREADY_RESOLVED"
    assert stub.ListReviews(F.ListReviewsRequest(tenant_id="otp-bank")).reviews == []
    assert len(stub.ListReviews(F.ListReviewsRequest(tenant_id="otp-bank", status="rejected")).reviews) == 1


def test_harmless_text_does_not_trigger_review(stub, mfa_server):
    setup_subject(stub)
    s = start(stub, text="我想查询一下账户余额, and the safety of my accountant's office")
    assert "FRAUD_SCRIPT_PHRASE" not in [r.code for r in s.risk.reasons]


def test_biometric_service_down_means_degraded_mode_and_never_allow(stub, mfa_server):
    """Default policy; the face service is unreachable (the e2e suite stops a real one)."""
    settings = mfa_server.settings
    ref = setup_subject(stub, subject("bank-a", "cust-9"))
    app = App()
    s = start(stub, app, ref=ref)
    assert ["FACTOR_TYPE_FACE", "FACTOR_TYPE_SMS_OTP"] in sets(s.acceptable)
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=app.face(s, b"\xff\xd8 not reached")))
    assert not r.result.passed and r.result.reasons[0].code == "FACE_SERVICE_UNAVAILABLE"
    assert r.attempts_left == 5  # an outage is not the customer's failure
    otp_round(stub, settings, s.session_id)
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_STEP_UP  # voice + OTP is still possible; OTP alone never is
    assert sets(d.still_needed) == [["FACTOR_TYPE_VOICE"]]


def test_hostile_tokens_for_relying_parties(stub, mfa_server):
    setup_subject(stub)
    s = start(stub)
    otp_round(stub, mfa_server.settings, s.session_id)
    token = stub.Decide(F.DecideRequest(session_id=s.session_id)).token
    jwks = stub.GetSigningKeys(F.GetSigningKeysRequest()).jwks_json
    head, body, sig = token.split(".")
    forged = jwt.utils.base64url_encode(json.dumps({**jwt.decode(token, options={"verify_signature": False}),
                                                    "decision": "allow", "aud": "otp-bank"}).encode()).decode()
    for bad in (f"{head}.{forged}.{sig}", f"{head}.{body}.{sig[:-4]}AAAA"):
        with pytest.raises(jwt.InvalidTokenError):
            verify_token(bad, jwks, mfa_server.settings.mfa.issuer, "otp-bank")
    with pytest.raises(jwt.InvalidAudienceError):
        verify_token(token, jwks, mfa_server.settings.mfa.issuer, "another-bank")


def test_everything_significant_is_audited_without_personal_data(stub, mfa_server):
    from services.common.audit.signing import AuditSigner
    from services.common.audit.verify import verify
    from services.common.storage import open_storage

    settings = mfa_server.settings
    setup_subject(stub)
    app = bind(stub, settings, App())
    s = start(stub, app, text="请帮我转到安全账户")
    stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s)))
    code = otp_round(stub, settings, s.session_id)
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    stub.ResolveReview(F.ResolveReviewRequest(review_id=d.review_id, approve=True, note="called back"))
    s = start(stub, app)
    thief = App(app.device)
    thief.device_id, thief.shown = app.device_id, app.shown
    for _ in range(5):
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=thief.proof(s)))
    stub.UnlockSubject(F.UnlockSubjectRequest(subject=subject(), reason="identity-verified"))
    stub.RevokeDevice(F.RevokeDeviceRequest(subject=subject(), device_id=app.device_id))
    assert code.result.passed
    store = open_storage(settings.storage_dsn)
    try:
        rows = list(store.audit.iter_records())
        events = {r.event_type for r in rows}
        assert {"mfa.session_started", "mfa.factor", "mfa.otp_sent", "mfa.decision", "mfa.device_bound",
                "mfa.review_resolved", "mfa.subject_locked", "mfa.subject_unlocked", "mfa.device_revoked"} <= events
        text = " ".join(f"{r.subject_pseudonym} {r.details}" for r in rows)
        for secret in ("cust-0001", "+8613800135678", "13800135678", "安全账户", outbox_codes(settings)[-1],
                       s.nonce, "inst-7f3a"):
            assert secret not in text
        signer = AuditSigner.load(settings.audit_signing_key_file)
        assert verify(store.audit, signer.public_key).ok
    finally:
        store.close()
