"""Captures bound to the session and the device (the injection defence), over gRPC on loopback.

The face service is unreachable here: a binding is verified before the MFA calls it, so a broken
binding fails the factor with its own reason and no biometric call (a call would have answered
FACE_SERVICE_UNAVAILABLE), and a valid one is what lets a capture reach the service. With the
real face and voice services: tests/mfa/test_e2e.py.
"""

from __future__ import annotations

import json

import grpc
import jwt
import pytest

from services.common.api.v1 import common_pb2, mfa_pb2, mfa_pb2_grpc
from services.common.errors import details_of
from services.mfa.binding import ContextError, parse_context, payload_digest, transaction_context
from tests.conftest import ServiceHarness, make_settings
from tests.mfa.authenticator import SoftAuthenticator
from tests.mfa.conftest import DEAD, App, setup_subject, subject
from tests.mfa.test_degraded_and_hostile import count_rows
from tests.mfa.test_flows import bind, otp_round, start

F = mfa_pb2
TENANT = "bind-bank"
PAYEE = F.Payee(name="李雷 Li Lei", account_masked="6222 **** **** 1234")
PHOTO, OTHER_PHOTO = b"\xff\xd8 the photo the app took", b"\xff\xd8 a photo downloaded elsewhere"


# ---------------------------------------------------------------- the bytes a device signs
def test_the_transaction_context_is_canonical_json_a_client_can_rebuild():
    """Written out by hand: what a client SDK in another language must produce."""
    got = transaction_context(session_id="ses_1", nonce="n1", tenant="bank-a", action="payment",
                              amount=("CNY", 490000), payee={"name": "李雷", "account": "**** 1234"},
                              evidence=[payload_digest(b"abc")])
    assert got == ('{"action":"payment","amount":{"cur":"CNY","minor":490000},"evidence":'
                   '["ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"],"nonce":"n1",'
                   '"payee":{"account":"**** 1234","name":"李雷"},"sid":"ses_1","tenant":"bank-a","v":1}').encode()
    login = transaction_context(session_id="ses_2", nonce="n2", tenant="t", action="login")
    assert login == (b'{"action":"login","amount":null,"evidence":[],"nonce":"n2","payee":null,"sid":"ses_2",'
                     b'"tenant":"t","v":1}')
    assert parse_context(got).amount == ("CNY", 490000)


@pytest.mark.parametrize("bad", [
    b'{"v":1, "sid":"s"}',
    b'{"action":"login","amount":null,"evidence":[],"nonce":"n2","payee":null,"sid":"ses_2","tenant":"t","v":2}',
    b'{"tenant":"t","action":"login","amount":null,"evidence":[],"nonce":"n2","payee":null,"sid":"ses_2","v":1}',
    b'{"action":"login","amount":null,"evidence":[],"extra":1,"nonce":"n2","payee":null,"sid":"ses_2","tenant":"t","v":1}',
    b'{"action":"login","amount":null,"evidence":[],"nonce":"n","payee":{"account":"*","name":"\\u674e"},'
    b'"sid":"s","tenant":"t","v":1}',
    b"\xff\xfe not utf-8",
], ids=["whitespace", "version", "unsorted", "extra-key", "escaped", "not-utf8"])
def test_a_context_not_in_canonical_form_is_not_read(bad):
    with pytest.raises(ContextError):
        parse_context(bad)


# ---------------------------------------------------------------- a bound device's captures
@pytest.fixture
def bound(stub, mfa_server):
    """A subject of the bind-bank tenant whose app bound its key after an SMS OTP login."""
    ref = setup_subject(stub, subject(TENANT, "cust-bind"))
    return ref, bind(stub, mfa_server.settings, App(), ref=ref)


def submit_face(stub, s, evidence):
    return stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=evidence))


def codes(result):
    return [r.code for r in result.reasons]


def test_an_unbound_capture_is_refused_before_anything_is_written(stub, mfa_server, bound):
    from services.common.storage import open_storage

    ref, app = bound
    s = start(stub, app, ref=ref)
    store = open_storage(mfa_server.settings.storage_dsn)
    try:
        before = count_rows(store)
        for evidence in (F.FaceEvidence(image=common_pb2.Image(data=PHOTO)),
                         F.FaceEvidence(image=common_pb2.Image(data=PHOTO), binding=F.CaptureBinding(
                             device_id=app.device_id))):  # a device id without a proof
            with pytest.raises(grpc.RpcError) as err:
                submit_face(stub, s, evidence)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert details_of(err.value)["reason"] == "CAPTURE_NOT_BOUND" and "face.binding" in (err.value.details() or "")
        assert count_rows(store) == before
    finally:
        store.close()
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_STEP_UP  # nothing was counted


def _other_key(app):
    thief = App(app.device)
    thief.device_id, thief.shown = app.device_id, app.shown
    return thief


BROKEN = {
    # name: (make the evidence from (app, session, other session), reason)
    "another session's context": (lambda app, s, o: F.FaceEvidence(
        image=common_pb2.Image(data=PHOTO), binding=app.binding(o, [PHOTO])), "CAPTURE_FOR_OTHER_SESSION"),
    "another session's signature": (lambda app, s, o: F.FaceEvidence(
        image=common_pb2.Image(data=PHOTO), binding=app.binding(o, [PHOTO], send_context=False)),
        "CAPTURE_SIGNATURE_INVALID"),
    "another photo than signed": (lambda app, s, o: F.FaceEvidence(
        image=common_pb2.Image(data=OTHER_PHOTO), binding=app.binding(s, [PHOTO])), "CAPTURE_EVIDENCE_MISMATCH"),
    "another photo, no context": (lambda app, s, o: F.FaceEvidence(
        image=common_pb2.Image(data=OTHER_PHOTO), binding=app.binding(s, [PHOTO], send_context=False)),
        "CAPTURE_SIGNATURE_INVALID"),
    "another key": (lambda app, s, o: _other_key(app).face(s, PHOTO), "CAPTURE_SIGNATURE_INVALID"),
    "the session nonce only": (lambda app, s, o: F.FaceEvidence(
        image=common_pb2.Image(data=PHOTO), binding=F.CaptureBinding(
            device_id=app.device_id, signature=app.sign(s.nonce.encode()))), "CAPTURE_SIGNATURE_INVALID"),
    "an unknown device": (lambda app, s, o: F.FaceEvidence(
        image=common_pb2.Image(data=PHOTO), binding=F.CaptureBinding(
            device_id="dev_unknown", signature=app.sign(app.context(s, [payload_digest(PHOTO)])))),
        "CAPTURE_DEVICE_NOT_BOUND"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_binding_that_does_not_hold_fails_the_factor_with_a_veto_and_no_biometric_call(stub, bound, case):
    make, reason = BROKEN[case]
    ref, app = bound
    other = start(stub, app, ref=ref)
    s = start(stub, app, ref=ref)
    r = submit_face(stub, s, make(app, s, other)).result
    assert (r.passed, r.veto, codes(r)) == (False, True, [reason]), r
    assert r.binding == "" and not r.HasField("target_fmr")
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "VETO" and reason in [x.code for x in d.reasons]


def test_a_capture_signed_for_another_amount_or_payee_is_refused(stub, bound):
    ref, app = bound
    s = start(stub, app, ref=ref, action="payment", amount=4_900_00, payee=PAYEE)
    shown = dict(app.shown[s.session_id])
    for change in ({"amount": ("CNY", 9_900_00)}, {"payee": {"name": "王芳", "account": "6222 **** **** 9999"}},
                   {"action": "login"}):
        app.shown[s.session_id] = {**shown, **change}
        r = submit_face(stub, s, app.face(s, PHOTO)).result
        assert (r.passed, r.veto, codes(r)) == (False, True, ["CAPTURE_CONTEXT_MISMATCH"]), (change, r)
    app.shown[s.session_id] = shown
    with pytest.raises(grpc.RpcError) as err:  # the payee is only kept as a keyed hash: the context must come
        submit_face(stub, s, app.face(s, PHOTO, send_context=False))
    assert details_of(err.value)["reason"] == "CAPTURE_CONTEXT_REQUIRED"


def test_a_valid_binding_reaches_the_service_and_proves_the_device_key(stub, mfa_server, bound):
    from services.common.storage import open_storage

    ref, app = bound
    for send_context in (True, False):  # without the context the service builds the same bytes
        s = start(stub, app, ref=ref)
        r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=app.face(
            s, PHOTO, send_context=send_context)))
        assert codes(r.result) == ["FACE_SERVICE_UNAVAILABLE"] and r.result.binding == "device"
        assert not r.result.veto  # an outage is not the customer's failure
        assert r.attempts_left == 5
    store = open_storage(mfa_server.settings.storage_dsn)
    try:
        last = [json.loads(x.details) for x in store.audit.iter_records() if x.event_type == "mfa.factor"][-1]
    finally:
        store.close()
    assert (last["binding"], last["device_id"], last["also"]) == ("device", app.device_id, ["device"])
    # the capture's signature proved the device key: this tenant's login takes [device] alone
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_ALLOW and list(d.amr) == ["swk"]


def test_a_payment_names_its_payee_signed_by_the_device_and_kept_only_as_a_keyed_hash(stub, mfa_server, bound):
    from services.common.storage import open_storage

    ref, app = bound
    for bad, field in ((F.Payee(name="Li Lei", account_masked="6222021234567890123"), "payee.account_masked"),
                       (F.Payee(name="", account_masked="**** 1234"), "payee.name"),
                       (F.Payee(name="call 13800135678", account_masked="**** 1234"), "payee.name")):
        with pytest.raises(grpc.RpcError) as err:
            start(stub, app, ref=ref, action="payment", amount=100_00, payee=bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in details_of(err.value)["fields"]
    with pytest.raises(grpc.RpcError) as err:
        start(stub, app, ref=ref, action="payment", amount=100_00)
    assert "payee" in details_of(err.value)["fields"]

    s = start(stub, app, ref=ref, action="payment", amount=100_00, payee=PAYEE)
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s)))
    assert r.result.passed and r.result.binding == "device"
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s, send_context=False)))
    assert details_of(err.value)["reason"] == "DEVICE_CONTEXT_REQUIRED"
    otp_round(stub, mfa_server.settings, s.session_id, payee=PAYEE)
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_ALLOW
    claims = jwt.decode(d.token, options={"verify_signature": False})
    assert claims["amt"] == {"cur": "CNY", "minor": 100_00} and len(claims["pay"]) == 64
    assert {f["f"]: f.get("bind") for f in claims["fac"]} == {"device": "device", "sms_otp": None}
    store = open_storage(mfa_server.settings.storage_dsn)
    try:
        text = " ".join(r.details for r in store.audit.iter_records()) + json.dumps(
            [dict(x.state) for x in [store_session(store, s.session_id)]]) + json.dumps(claims)
    finally:
        store.close()
    # the masked account as shown, not its digits alone: "1234" turns up in hashes and ids by chance
    for secret in ("李雷", "Li Lei", PAYEE.account_masked, "6222 *", "* 1234"):
        assert secret not in text
    assert claims["pay"] in text  # the same keyed hash in the session, the audit and the token


def store_session(store, session_id):
    from services.mfa.storage import attach

    return attach(store).auth_sessions.get(session_id)


def test_a_new_device_signs_its_captures_with_the_key_it_then_binds_and_no_other(stub, mfa_server):
    settings = mfa_server.settings
    ref = setup_subject(stub, subject(TENANT, "cust-new-device"))
    app = App()
    s = start(stub, app, ref=ref)
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=app.face(s, PHOTO)))
    assert r.result.binding == "new_device" and codes(r.result) == ["FACE_SERVICE_UNAVAILABLE"]
    other = App(app.device)
    other.shown = app.shown
    otp_round(stub, settings, s.session_id)
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_ALLOW and list(d.amr) == ["sms"]  # a new device's key proves nothing
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterDevice(F.RegisterDeviceRequest(session_id=s.session_id, device=app.device,
                                                    public_key=other.public_der))
    assert details_of(err.value)["reason"] == "DEVICE_KEY_MISMATCH"
    app.device_id = stub.RegisterDevice(F.RegisterDeviceRequest(session_id=s.session_id, device=app.device,
                                                                public_key=app.public_der)).device_id
    s = start(stub, app, ref=ref)
    assert s.device_bound
    with pytest.raises(grpc.RpcError) as err:  # on a bound device the bound key signs
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=F.FaceEvidence(
            image=common_pb2.Image(data=PHOTO), binding=F.CaptureBinding(
                public_key=other.public_der, signature=other.sign(other.context(s, [payload_digest(PHOTO)]))))))
    assert details_of(err.value)["reason"] == "NEW_DEVICE_KEY_NOT_ALLOWED"


def test_an_ecdsa_p256_device_key_signs_der_or_raw_r_s(stub, mfa_server):
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    ref = setup_subject(stub, subject(TENANT, "cust-p256"))
    app = bind(stub, mfa_server.settings, App(ec=True), ref=ref)
    s = start(stub, app, ref=ref)
    assert stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s))).result.passed
    s = start(stub, app, ref=ref)
    r_, s_ = decode_dss_signature(app.sign(app.context(s)))
    raw = F.DeviceProof(device_id=app.device_id, signature=r_.to_bytes(32, "big") + s_.to_bytes(32, "big"))
    assert stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=raw)).result.passed


# ---------------------------------------------------------------- WebAuthn (passkeys)
def webauthn_login(stub, settings, ref, authenticator, attestation="none"):
    """Binds a passkey after an SMS OTP login; returns the App with its device id."""
    app = App()
    s = start(stub, app, ref=ref)
    with pytest.raises(grpc.RpcError) as err:  # options only for a strong session
        stub.StartDeviceRegistration(F.StartDeviceRegistrationRequest(session_id=s.session_id))
    assert details_of(err.value)["reason"] == "STRONG_AUTHENTICATION_REQUIRED"
    otp_round(stub, settings, s.session_id)
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
    options = stub.StartDeviceRegistration(F.StartDeviceRegistrationRequest(session_id=s.session_id)).options_json
    registration = authenticator.create(options, attestation)
    app.device_id = stub.RegisterDevice(F.RegisterDeviceRequest(
        session_id=s.session_id, device=app.device, webauthn_registration_json=registration, label="passkey")).device_id
    return app, options


def webauthn_proof(app, authenticator, s):
    return F.DeviceProof(device_id=app.device_id, context=app.context(s),
                         webauthn=authenticator.assert_context(app.context(s)))


@pytest.mark.parametrize("attestation", ["none", "packed"])
def test_a_passkey_binds_the_device_and_its_assertions_prove_it_over_the_context(stub, mfa_server, attestation):
    settings = mfa_server.settings
    ref = setup_subject(stub, subject(TENANT, f"cust-passkey-{attestation}"))
    authenticator = SoftAuthenticator()
    app, options = webauthn_login(stub, settings, ref, authenticator, attestation)
    assert json.loads(options)["user"]["name"].startswith("ps1_")  # a pseudonym, never the customer reference
    listed = stub.ListDevices(F.ListDevicesRequest(subject=ref)).devices
    assert [(d.device_id, d.kind) for d in listed] == [(app.device_id, "webauthn")]

    s = start(stub, app, ref=ref)
    assert s.device_bound
    proof = webauthn_proof(app, authenticator, s)
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=proof))
    assert r.result.passed and r.result.binding == "webauthn"
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW

    s2 = start(stub, app, ref=ref)  # the same assertion in another session: its challenge is the old context
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s2.session_id, device=F.DeviceProof(
        device_id=app.device_id, webauthn=proof.webauthn)))
    assert codes(r.result) == ["DEVICE_SIGNATURE_INVALID"] and "challenge" in r.result.reasons[0].message
    authenticator.counter -= 1  # a clone whose counter lags: the service saw a higher one
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s2.session_id, device=webauthn_proof(app, authenticator, s2)))
    assert codes(r.result) == ["DEVICE_SIGNATURE_INVALID"] and "sign count" in r.result.reasons[0].message
    authenticator.counter += 5
    # a face capture bound by the passkey: verified, then the (unreachable) face service is asked
    s3 = start(stub, app, ref=ref)
    context = app.context(s3, [payload_digest(PHOTO)])
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s3.session_id, face=F.FaceEvidence(
        image=common_pb2.Image(data=PHOTO), binding=F.CaptureBinding(
            device_id=app.device_id, context=context, webauthn=authenticator.assert_context(context)))))
    assert r.result.binding == "webauthn" and codes(r.result) == ["FACE_SERVICE_UNAVAILABLE"]


def test_a_passkey_registration_must_answer_this_sessions_options_from_an_allowed_origin(stub, mfa_server):
    settings = mfa_server.settings
    ref = setup_subject(stub, subject(TENANT, "cust-passkey-bad"))
    sessions = []
    for _ in range(2):
        app = App()
        s = start(stub, app, ref=ref)
        otp_round(stub, settings, s.session_id)
        assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
        sessions.append((app, s))
    (app, s), (_, other) = sessions
    other_options = stub.StartDeviceRegistration(F.StartDeviceRegistrationRequest(session_id=other.session_id))
    own = stub.StartDeviceRegistration(F.StartDeviceRegistrationRequest(session_id=s.session_id)).options_json
    for registration in (SoftAuthenticator().create(other_options.options_json),
                         SoftAuthenticator().create(own, origin="https://evil.example"),
                         json.dumps({"id": "x", "response": {}})):
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterDevice(F.RegisterDeviceRequest(session_id=s.session_id, device=app.device,
                                                        webauthn_registration_json=registration))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(err.value)["reason"] == "WEBAUTHN_REGISTRATION_INVALID"
    assert stub.ListDevices(F.ListDevicesRequest(subject=ref)).devices == []


# ---------------------------------------------------------------- registered terminals
def test_a_registered_terminal_binds_captures_of_its_own_channel_only(tmp_path):
    from services.common.server.auth import token_sha256
    from services.common.storage import open_storage

    (tmp_path / "pol").mkdir()
    principals = [
        {"name": "kiosk-7", "roles": ["orchestrator"], "token_sha256": token_sha256("tok-kiosk"),
         "tenants": ["bank-k"], "terminal": {"channel": "kiosk"}},
        {"name": "bank-backend", "roles": ["orchestrator", "enroller", "admin"], "token_sha256": token_sha256("tok-bank")}]
    settings = make_settings(tmp_path / "data", auth={"principals": principals, "dev_credentials": False},
                             mfa={"policy_dir": str(tmp_path / "pol")},
                             clients={"face": {"target": DEAD, "retries": 0}, "voice": {"target": DEAD, "retries": 0}})
    h = ServiceHarness(settings)
    h.start("mfa")
    from services.common.client import connect

    ref = subject("bank-k", "cust-kiosk")
    terminal = F.CaptureBinding(terminal=F.TerminalCapture())
    try:
        with connect(h.running["mfa"].address, "tok-kiosk") as kch, connect(h.running["mfa"].address, "tok-bank") as bch:
            kiosk, bank = mfa_pb2_grpc.MfaServiceStub(kch), mfa_pb2_grpc.MfaServiceStub(bch)
            setup_subject(bank, ref)
            s = kiosk.StartAuthentication(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_KIOSK,
                                                                       action="login"))
            face = F.FaceEvidence(image=common_pb2.Image(data=PHOTO), binding=terminal)
            with pytest.raises(grpc.RpcError) as err:  # the bank's back end is no terminal
                bank.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=face))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert details_of(err.value)["reason"] == "TERMINAL_NOT_REGISTERED"
            app = App()
            req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device)
            on_app = bank.StartAuthentication(req)
            with pytest.raises(grpc.RpcError) as err:  # a kiosk's word counts on kiosk sessions only
                kiosk.SubmitFactor(F.SubmitFactorRequest(session_id=on_app.session_id, face=face))
            assert details_of(err.value)["reason"] == "TERMINAL_NOT_REGISTERED"
            r = kiosk.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=face))
            assert r.result.binding == "terminal" and codes(r.result) == ["FACE_SERVICE_UNAVAILABLE"]
        store = open_storage(settings.storage_dsn)
        try:
            factor = [json.loads(x.details) for x in store.audit.iter_records() if x.event_type == "mfa.factor"]
        finally:
            store.close()
        assert [(f["binding"], f.get("terminal")) for f in factor] == [("terminal", "kiosk-7")]
    finally:
        h.stop()


# ---------------------------------------------------------------- the default policy
def test_the_default_policy_never_lets_one_biometric_decide_and_says_so_at_load():
    from services.common.config import PROJECT_ROOT
    from services.mfa.policy import PolicyError, load_policy, parse_policy
    from services.mfa.policy.schema import BIOMETRIC, POSSESSION

    policy = load_policy(PROJECT_ROOT / "services" / "mfa" / "policies" / "default.yaml")
    sets = [s for a in policy.actions.values() for s in a.acceptable]
    sets += [s for a in policy.actions.values() for c in a.channels.values() for s in c.acceptable or ()]
    assert all(set(s) & POSSESSION for s in sets if set(s) & BIOMETRIC)
    assert policy.actions["payment"].payee == "required" and policy.lockout.subject_lock_s > 0
    bands = policy.actions["payment"].amount_bands["CNY"]
    assert bands[0].min_independent == 0 and all(b.min_independent >= 2 for b in bands[1:])
    assert policy.voice_challenge("login", "ivr") and policy.voice_challenge("payment", "app")
    alone = "version: v1\nactions:\n  payment: {required: 4, acceptable: [[face], [device, sms_otp]]}\n"
    with pytest.raises(PolicyError) as err:
        parse_policy(alone)
    assert "actions.payment.acceptable.0 ['face']" in str(err.value) and "never counts alone" in str(err.value)
    assert parse_policy(alone + "binding: {biometric_alone: true}\n").actions["payment"]  # an explicit choice


def test_independent_authenticators_a_device_and_its_captures_are_one():
    """Fusion: above the band, face + device proven by one phone's key is one authenticator; the SMS
    channel is asked for, not another capture from the same phone."""
    from services.mfa.fusion import FactorOutcome, Plan, decide

    plan = Plan(6.0, 2, (("face", "device"), ("face", "sms_otp"), ("voice", "device"), ("device", "sms_otp")),
                min_independent=2)
    phone = [FactorOutcome("face", True, 8.0, authenticator="device:dev_1", binding="device"),
             FactorOutcome("device", True, 3.0, authenticator="device:dev_1", binding="device")]
    d = decide(plan, phone)
    assert d.outcome == "step_up" and d.still_needed == (("sms_otp",),)
    assert decide(plan, phone + [FactorOutcome("sms_otp", True, 3.0, authenticator="sms")]).outcome == "allow"
    assert decide(Plan(6.0, 2, plan.sets), phone).outcome == "allow"  # below the band: one phone suffices
