"""Degraded mode with the default policy when a biometric service is unreachable, and hostile
inputs: each gets a clear status, and nothing stored is changed by it."""

from __future__ import annotations

from typing import Any, Callable

import grpc
import pytest

from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.errors import ServiceError, details_of
from services.mfa import devices, subjects
from services.mfa.storage import DeviceRecord
from services.common.context import SYSTEM
from tests.mfa.conftest import App, outbox_codes, setup_subject, subject

F = mfa_pb2


def bound_app(orch, ref):
    app = App()
    dev = devices.canonical(app.device, orch._device_key, ref.tenant_id)
    rec = orch.store.devices.add(DeviceRecord(ref.tenant_id, ref.subject_id, dev.fingerprint, app.public_der,
                                              dev.soft, "phone", "android", id="dev_test1"))
    app.device_id = rec.id
    return app


def test_face_down_gives_review_with_otp_and_bound_device_never_allow(orch):
    ref = common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-42")
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"), caller=SYSTEM)
    app = bound_app(orch, ref)
    req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device)
    s = app.opened(req, orch.start(req, caller=SYSTEM))
    assert s.device_bound
    r = orch.submit(F.SubmitFactorRequest(session_id=s.session_id, face=app.face(s, b"jpeg")), caller=SYSTEM)
    assert r.result.reasons[0].code == "FACE_SERVICE_UNAVAILABLE" and not r.result.passed
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    orch.submit(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=outbox_codes(orch.rt.settings)[-1])), caller=SYSTEM)
    orch.submit(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s)), caller=SYSTEM)
    d = orch.decide(F.DecideRequest(session_id=s.session_id), caller=SYSTEM)
    assert d.outcome == F.OUTCOME_REVIEW and "DEGRADED_MODE" in [x.code for x in d.reasons] and d.review_id


def test_an_open_circuit_plans_degraded_mode_from_the_start(orch):
    ref = common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-43")
    app = bound_app(orch, ref)
    for _ in range(orch.rt.settings.clients.face.breaker_failures):
        req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device)
        s = app.opened(req, orch.start(req, caller=SYSTEM))
        orch.submit(F.SubmitFactorRequest(session_id=s.session_id, face=app.face(s, b"x")), caller=SYSTEM)
    assert not orch.clients["face"].available
    s = orch.start(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device), caller=SYSTEM)
    acceptable = [sorted(F.FactorType.Name(f) for f in fs.factors) for fs in s.acceptable]
    assert ["FACTOR_TYPE_DEVICE", "FACTOR_TYPE_SMS_OTP"] in acceptable
    assert not any("FACTOR_TYPE_FACE" in fs for fs in acceptable)
    # the lockout never counted the outage against the customer
    assert orch.lockouts.subject("bank-a", "cust-43", orch.policies.get("bank-a").lockout, orch.clock()).failures == 0


def count_rows(storage):
    with storage.db.read() as q:
        return {t: q.one(f"SELECT COUNT(*) FROM {t}")[0] for t in
                ("auth_sessions", "otp_challenges", "devices", "mfa_reviews", "mfa_lockouts", "subjects")}


S = "ses_" + "0" * 32
START = dict(subject=subject(), channel=F.CHANNEL_APP, action="login", device=App().device)


def start_req(**changes):
    return F.StartAuthenticationRequest(**{**START, **changes})


HOSTILE = [
    ("StartAuthentication", start_req(channel=F.CHANNEL_UNSPECIFIED), "INVALID_ARGUMENT", "channel"),
    ("StartAuthentication", start_req(action="transfer_all"), "INVALID_ARGUMENT", "action"),
    ("StartAuthentication", start_req(action="LOGIN; DROP TABLE"), "INVALID_ARGUMENT", "action"),
    ("StartAuthentication", start_req(subject=common_pb2.SubjectRef(tenant_id="otp-bank", subject_id="13800135678")),
     "INVALID_ARGUMENT", "subject.subject_id"),
    ("StartAuthentication", start_req(subject=common_pb2.SubjectRef(tenant_id="../etc", subject_id="c")),
     "INVALID_ARGUMENT", "subject.tenant_id"),
    ("StartAuthentication", start_req(device=F.DeviceInfo()), "INVALID_ARGUMENT", "device"),
    ("StartAuthentication", start_req(device=F.DeviceInfo(platform="android", model="m" * 500)), "INVALID_ARGUMENT",
     "device.model"),
    ("StartAuthentication", start_req(context=F.ContextSignals(conversation_text="x" * 20001)), "INVALID_ARGUMENT",
     "context.conversation_text"),
    ("StartAuthentication", start_req(context=F.ContextSignals(ip_address="999.1.1.1")), "INVALID_ARGUMENT",
     "context.ip_address"),
    ("StartAuthentication", start_req(context=F.ContextSignals(latitude=float("nan"))), "INVALID_ARGUMENT",
     "context.latitude"),
    ("StartAuthentication", start_req(context=F.ContextSignals(country="China")), "INVALID_ARGUMENT", "context.country"),
    ("StartAuthentication", start_req(action="payment", amount=F.Money(currency="cny", amount_minor=1)),
     "INVALID_ARGUMENT", "amount.currency"),
    ("StartAuthentication", start_req(action="payment", amount=F.Money(currency="CNY", amount_minor=-5)),
     "INVALID_ARGUMENT", "amount.amount_minor"),
    ("StartAuthentication", start_req(action="payment"), "INVALID_ARGUMENT", "amount"),
    ("SubmitFactor", F.SubmitFactorRequest(session_id="'; --"), "INVALID_ARGUMENT", "session_id"),
    ("SubmitFactor", F.SubmitFactorRequest(session_id=S, otp=F.OtpEvidence(code="123456")), "NOT_FOUND", None),
    ("Decide", F.DecideRequest(session_id=S), "NOT_FOUND", None),
    ("SendOtp", F.SendOtpRequest(session_id=""), "INVALID_ARGUMENT", "session_id"),
    ("StartBiometricChallenge", F.StartBiometricChallengeRequest(session_id=S), "NOT_FOUND", None),
    ("RegisterDevice", F.RegisterDeviceRequest(session_id=S), "NOT_FOUND", None),
    ("RevokeDevice", F.RevokeDeviceRequest(subject=subject(), device_id="dev_nope"), "NOT_FOUND", None),
    ("RevokeDevice", F.RevokeDeviceRequest(subject=subject(), device_id=""), "INVALID_ARGUMENT", "device_id"),
    ("ListReviews", F.ListReviewsRequest(tenant_id="otp-bank", status="open"), "INVALID_ARGUMENT", "status"),
    ("ListReviews", F.ListReviewsRequest(tenant_id="otp-bank", page_size=100000), "INVALID_ARGUMENT", "page_size"),
    ("ListReviews", F.ListReviewsRequest(tenant_id="otp-bank", page_token="!!notbase64"), "INVALID_ARGUMENT",
     "page_token"),
    ("ResolveReview", F.ResolveReviewRequest(review_id="rev_nope"), "NOT_FOUND", None),
    ("ResolveReview", F.ResolveReviewRequest(review_id="rev_nope", note="n" * 1001), "INVALID_ARGUMENT", "note"),
    ("GetReview", F.GetReviewRequest(review_id="rev_nope"), "NOT_FOUND", None),
    ("GetReview", F.GetReviewRequest(review_id="'; --"), "INVALID_ARGUMENT", "review_id"),
    ("UnlockSubject", F.UnlockSubjectRequest(subject=subject(), reason="call +8613800135678"), "INVALID_ARGUMENT",
     "reason"),
]


def _call(stub, method, req):
    try:
        getattr(stub, method)(req)
    except grpc.RpcError as err:
        return err
    return None


@pytest.mark.parametrize("method,req,code,field", HOSTILE, ids=[f"{h[0]}-{i}" for i, h in enumerate(HOSTILE)])
def test_hostile_inputs_get_a_clear_status_and_change_nothing(stub, mfa_server, method, req, code, field):
    from services.common.storage import open_storage

    setup_subject(stub)
    store = open_storage(mfa_server.settings.storage_dsn)
    try:
        before = count_rows(store)
        err = _call(stub, method, req)
        assert err is not None and err.code().name == code, err
        if field:
            assert field in details_of(err)["fields"], details_of(err)
        assert count_rows(store) == before
    finally:
        store.close()


def test_session_scoped_hostile_inputs(stub, mfa_server):
    setup_subject(stub)
    s = stub.StartAuthentication(start_req())
    cases = [
        (F.SubmitFactorRequest(session_id=s.session_id), "INVALID_ARGUMENT"),  # no evidence
        (F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code="12ab56")), "INVALID_ARGUMENT"),
        (F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code="١٢٣٤٥٦")), "INVALID_ARGUMENT"),
        (F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code="123456")), "FAILED_PRECONDITION"),
        (F.SubmitFactorRequest(session_id=s.session_id, face=F.FaceEvidence()), "FAILED_PRECONDITION"),
        (F.SubmitFactorRequest(session_id=s.session_id, device=F.DeviceProof(device_id="dev_x")), "FAILED_PRECONDITION"),
    ]
    for req, code in cases:
        err = _call(stub, "SubmitFactor", req)
        assert err is not None and err.code().name == code, (req, err)
    err = _call(stub, "RegisterDevice", F.RegisterDeviceRequest(session_id=s.session_id, device=App().device,
                                                                 public_key=b"junk"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "public_key" in details_of(err)["fields"]
    err = _call(stub, "RegisterDevice", F.RegisterDeviceRequest(session_id=s.session_id, device=App().device,
                                                                 public_key=App().public_der))
    assert details_of(err)["reason"] == "STRONG_AUTHENTICATION_REQUIRED"
    # no attempt was counted for malformed input
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_STEP_UP


def test_idempotent_start(stub, mfa_server):
    setup_subject(stub)
    a = stub.StartAuthentication(start_req(idempotency_key="req-1"))
    b = stub.StartAuthentication(start_req(idempotency_key="req-1"))
    assert a.session_id == b.session_id and a.nonce == b.nonce
    err = _call(stub, "StartAuthentication", start_req(idempotency_key="req-1", action="payment",
                                                       amount=F.Money(currency="CNY", amount_minor=5)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and details_of(err)["reason"] == "IDEMPOTENCY_KEY_REUSED"


def test_a_tenant_bound_caller_cannot_touch_another_tenants_session_or_review(tmp_path):
    """The interceptor reads each RPC's declared tenant: for session and review ids it looks the
    object up; a caller bound to bank-a reaches none of otp-bank's, and all of its own."""
    from services.common.client import connect
    from services.common.api.v1 import mfa_pb2_grpc
    from services.common.server.auth import token_sha256
    from services.common.storage import open_storage
    from services.mfa.storage import ReviewRecord, attach
    from tests.conftest import ServiceHarness, make_settings
    from tests.mfa.conftest import DEAD, OTP_POLICY

    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "otp-bank.yaml").write_text(OTP_POLICY)
    (tmp_path / "pol" / "bank-a.yaml").write_text(OTP_POLICY)
    principals = [{"name": "bank-a-app", "roles": ["orchestrator", "admin"], "tenants": ["bank-a"],
                   "token_sha256": token_sha256("tok-a")},
                  {"name": "all", "roles": ["orchestrator", "enroller", "admin"], "token_sha256": token_sha256("tok-all")}]
    settings = make_settings(tmp_path / "data", auth={"principals": principals, "dev_credentials": False},
                             mfa={"policy_dir": str(tmp_path / "pol")},
                             clients={"face": {"target": DEAD}, "voice": {"target": DEAD}})
    h = ServiceHarness(settings)
    h.start("mfa")
    try:
        with connect(h.running["mfa"].address, "tok-all") as ch:
            theirs = mfa_pb2_grpc.MfaServiceStub(ch).StartAuthentication(start_req())
        with connect(h.running["mfa"].address, "tok-a") as ch:
            own = mfa_pb2_grpc.MfaServiceStub(ch).StartAuthentication(start_req(
                subject=common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-0001")))
        storage = open_storage(settings.storage_dsn)
        try:
            review = attach(storage).reviews.create(ReviewRecord("otp-bank", "cust-0001", theirs.session_id, "login", ()))
        finally:
            storage.close()
        calls: list[tuple[str, Callable[..., Any]]] = [("Decide", F.DecideRequest), ("SendOtp", F.SendOtpRequest),
                 ("StartBiometricChallenge", lambda session_id: F.StartBiometricChallengeRequest(
                     session_id=session_id, modality=common_pb2.MODALITY_FACE)),
                 ("SubmitFactor", lambda session_id: F.SubmitFactorRequest(
                     session_id=session_id, otp=F.OtpEvidence(code="123456"))),
                 ("RegisterDevice", lambda session_id: F.RegisterDeviceRequest(session_id=session_id)),
                 ("StartDeviceRegistration", F.StartDeviceRegistrationRequest),
                 ("SendPushConfirmation", F.SendPushConfirmationRequest),
                 ("GetPushConfirmation", lambda session_id: F.GetPushConfirmationRequest(
                     session_id=session_id, confirmation_id="pc_x", device_id="dev_x", signature=b"s")),
                 ("ConfirmTransaction", lambda session_id: F.ConfirmTransactionRequest(
                     session_id=session_id, answer=F.PushAnswer(confirmation_id="pc_x", device_id="dev_x")))]
        with connect(h.running["mfa"].address, "tok-a") as ch:
            stub = mfa_pb2_grpc.MfaServiceStub(ch)
            for method, make in calls:
                err = _call(stub, method, make(session_id=theirs.session_id))
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err)
                assert details_of(err)["reason"] == "TENANT_NOT_ALLOWED" and "session's tenant" in err.details()
                mine = _call(stub, method, make(session_id=own.session_id))  # past the tenant check
                assert mine is None or mine.code() != grpc.StatusCode.PERMISSION_DENIED, (method, mine)
            err = _call(stub, "ResolveReview", F.ResolveReviewRequest(review_id=review.id, approve=True))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and details_of(err)["reason"] == "TENANT_NOT_ALLOWED"
            err = _call(stub, "GetReview", F.GetReviewRequest(review_id=review.id))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and details_of(err)["reason"] == "TENANT_NOT_ALLOWED"
            err = _call(stub, "ResolveReview", F.ResolveReviewRequest(review_id="rev_unknown", approve=True))
            assert err.code() == grpc.StatusCode.NOT_FOUND  # no such review: the service says so
            err = _call(stub, "Decide", F.DecideRequest(session_id="not-a-session"))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        with connect(h.running["mfa"].address, "tok-all") as ch:  # a caller of every tenant
            assert mfa_pb2_grpc.MfaServiceStub(ch).ResolveReview(
                F.ResolveReviewRequest(review_id=review.id, approve=True)).review.status == "approved"
    finally:
        h.stop()


def test_a_decision_reached_concurrently_is_taken_once(orch):
    import threading

    ref = common_pb2.SubjectRef(tenant_id="otp-bank", subject_id="cust-77")
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"), caller=SYSTEM)
    s = orch.start(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=App().device), caller=SYSTEM)
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    orch.submit(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=outbox_codes(orch.rt.settings)[-1])), caller=SYSTEM)
    tokens = []
    threads = [threading.Thread(target=lambda: tokens.append(orch.decide(F.DecideRequest(session_id=s.session_id), caller=SYSTEM).token))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tokens)) == 1
    with orch.rt.storage.db.read() as q:
        assert q.one("SELECT COUNT(*) FROM audit_records WHERE event_type = 'mfa.decision'")[0] == 1


def test_errors_are_service_errors_in_process(orch):
    with pytest.raises(ServiceError):
        orch.decide(F.DecideRequest(session_id="nope"), caller=SYSTEM)


def test_delete_subject_with_the_biometric_services_down_names_them_and_erases_nothing(orch):
    """Never a silent partial erasure: the MFA's data stays until the templates are gone too."""
    ref = common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-77")
    subjects.record_consent(orch.rt, common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
        subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
        modalities=[common_pb2.MODALITY_FACE], granted=True, policy_version="privacy-2025-01")), caller=SYSTEM)
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"), caller=SYSTEM)
    app = bound_app(orch, ref)
    with pytest.raises(ServiceError) as err:
        subjects.delete_subject(orch.rt, orch.store, orch.clients, common_pb2.DeleteSubjectRequest(subject=ref), None,
                                orch.rate_limit_keys, caller=SYSTEM)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.reason == "FACE_AND_VOICE_SERVICE_UNAVAILABLE"
    assert "the face service" in err.value.message and "the voice service" in err.value.message
    assert orch.store.devices.get("bank-a", app.device_id) is not None
    assert orch.rt.storage.subjects.get_phone("bank-a", "cust-77") is not None
    assert len(orch.rt.storage.subjects.get_consents("bank-a", "cust-77")) == 1
    assert "subject.erased" not in [r.event_type for r in orch.rt.storage.audit.iter_records()]
