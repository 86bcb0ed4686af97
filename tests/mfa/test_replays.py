"""Replays and races an attacker who controls a client can send: the same proof twice (one after
the other, or released together on threads), through a real MFA server on loopback, on SQLite and
on PostgreSQL. A proof counts once in its session; the copy is refused with a clear status and
leaves nothing behind (no factor, no audit record, no lockout charge)."""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from services.common.api.v1 import mfa_pb2
from services.common.errors import details_of
from services.common.context import SYSTEM
from tests.conftest import race
from tests.mfa.conftest import App, outbox_codes, setup_subject, subject
from tests.mfa.test_flows import bind, start
from tests.mfa.test_lockout import audit_events

F = mfa_pb2
TENANT = "bind-bank"


def stored_factors(settings, session_id: str) -> list[tuple[str, bool]]:
    from services.common.storage import open_storage
    from services.mfa.state import SessionState
    from services.mfa.storage import attach

    store = open_storage(settings.storage_dsn)
    try:
        rec = attach(store).auth_sessions.get(session_id)
        assert rec is not None
        st = SessionState.from_json(dict(rec.state))
    finally:
        store.close()
    return [(f.factor, f.passed) for f in st.factors]


def factor_audits(settings, session_id: str) -> int:
    return len([e for e in audit_events(settings, "mfa.factor") if e["session_id"] == session_id])


def test_a_device_proof_counts_once_in_its_session_replayed_or_raced(stub, mfa_server):
    settings = mfa_server.settings
    ref = setup_subject(stub, subject(TENANT, "cust-replay-dev"))
    app = bind(stub, settings, App(), ref=ref)

    s = start(stub, app, ref=ref)
    proof = app.proof(s)
    assert stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=proof)).result.passed
    with pytest.raises(grpc.RpcError) as err:  # the same signature again
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=proof))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "DEVICE_ALREADY_PROVEN"
    assert stored_factors(settings, s.session_id) == [("device", True)]
    assert factor_audits(settings, s.session_id) == 1

    raced = start(stub, app, ref=ref)
    proof = app.proof(raced)
    results = race(2, lambda i: stub.SubmitFactor(F.SubmitFactorRequest(session_id=raced.session_id, device=proof)))
    passed = [r for r in results if not isinstance(r, grpc.RpcError)]
    refused = [details_of(r)["reason"] for r in results if isinstance(r, grpc.RpcError)]
    assert len(passed) == 1 and isinstance(passed[0], F.SubmitFactorResponse) and passed[0].result.passed, results
    assert refused == ["DEVICE_ALREADY_PROVEN"], results
    assert stored_factors(settings, raced.session_id) == [("device", True)]
    assert factor_audits(settings, raced.session_id) == 1


def test_of_two_codes_sent_concurrently_only_the_newest_works_and_once(orch, monkeypatch):
    """Two SendOtp calls on one session (no resend cool-down in otp-bank) that both looked for the
    previous code before either stored its own: both codes are stored live. Still only the
    session's newest code may answer, once; the other never becomes usable."""
    from tests.mfa.test_otp_sms import enrol, session, submit

    s = session(orch, enrol(orch))
    both_looked = threading.Barrier(2, timeout=30)
    create = orch.store.otp.create

    def create_after_both_looked(rec):
        both_looked.wait()
        return create(rec)
    monkeypatch.setattr(orch.store.otp, "create", create_after_both_looked)
    sent = race(2, lambda i: orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM))
    assert not any(isinstance(r, Exception) for r in sent), sent
    codes = outbox_codes(orch.rt.settings)[-2:]
    answers = [submit(orch, s.session_id, code).result for code in codes + codes]
    assert [a.passed for a in answers].count(True) == 1, [a.reasons[0].code for a in answers]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def push_env(request, tmp_path_factory):
    from tests.mfa.pushapp import push_server

    with push_server(tmp_path_factory.mktemp(f"replays-push-{request.param}"), request.param) as running:
        yield running


def test_a_session_decided_while_its_push_goes_out_is_not_changed_by_the_fall_back(push_env):
    """The push gateway fails after the confirmation was recorded; meanwhile the bank's Decide
    allowed the session on its device key and SMS code. The fall-back must not rewrite the plan of
    the decided session nor tell the client to carry on: it is refused SESSION_DECIDED."""
    from services.mfa.push import PushError
    from tests.mfa.pushapp import PushApp, customer, otp, start

    harness, stub, orch = push_env
    app = PushApp("inst-decided-push")
    ref = customer(stub, harness.settings, "cust-decided-push", app)
    s = start(stub, app, ref, action="change_phone")
    assert stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s))).result.passed
    assert otp(stub, harness.settings, s.session_id).result.passed
    decided = []

    class DecidedMeanwhile:
        def send(self, token, data, ttl_s, collapse_key):
            decided.append(stub.Decide(F.DecideRequest(session_id=s.session_id)))
            raise PushError("the provider timed out")

    saved, orch.push_gateway = orch.push_gateway, DecidedMeanwhile()
    try:
        before = orch.sessions.get(s.session_id)
        with pytest.raises(grpc.RpcError) as err:
            stub.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=s.session_id))
    finally:
        orch.push_gateway = saved
    assert decided[0].outcome == F.OUTCOME_ALLOW
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "SESSION_DECIDED"
    after = orch.sessions.get(s.session_id).state
    assert after.plan == before.state.plan and after.decision.outcome == "allow"
    assert not [r for r in orch.rt.storage.audit.iter_records()
                if r.event_type == "mfa.push_fallback" and s.session_id in r.details]


def test_a_lapsed_lock_forgotten_by_one_call_keeps_the_failure_another_charged_meanwhile(orch, clock, monkeypatch):
    """A subject's lock has run out. One call (A StartAuthentication) reads the lapsed lock and is
    about to forget it; meanwhile a wrong code of another call is charged to the fresh counter.
    A's forgetting must not wipe that failure: else every burst of calls right after a lock
    lapses evaluates more wrong guesses than the limit allows."""
    from datetime import timedelta

    from services.mfa.storage import LOCK_COST
    from tests.mfa.test_otp_sms import enrol, session, submit

    ref = enrol(orch, sid="cust-lapsed-lock")
    s = session(orch, ref)
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    wrong = f"{(int(outbox_codes(orch.rt.settings)[-1]) + 1) % 10 ** 6:06d}"
    lock_s = orch.policies.get(ref.tenant_id).lockout.subject_lock_s
    orch.store.lockouts.record_failure(ref.tenant_id, "subject", ref.subject_id, ref.subject_id, LOCK_COST,
                                       clock() - timedelta(seconds=lock_s + 1))
    reached, go_on = threading.Event(), threading.Event()
    reset = orch.store.lockouts.reset

    def held_reset(*args, **kw):
        if threading.current_thread() is other:
            reached.set()
            go_on.wait(30)
        return reset(*args, **kw)
    monkeypatch.setattr(orch.store.lockouts, "reset", held_reset)
    other = threading.Thread(target=lambda: session(orch, ref))
    other.start()
    try:
        assert reached.wait(30)
        r = submit(orch, s.session_id, wrong)
        assert not r.result.passed and r.result.reasons[0].code == "OTP_WRONG"
    finally:
        go_on.set()
        other.join(30)
    rec = orch.store.lockouts.get(ref.tenant_id, "subject", ref.subject_id)
    assert rec is not None and rec.failures == 1 and rec.locked_at is None


def test_a_challenge_asked_as_the_session_is_decided_is_refused_and_sends_nothing(orch, monkeypatch):
    """SendOtp found the session open, then the bank's Decide ended it before the code was claimed:
    the claim is refused SESSION_DECIDED, no SMS goes out, the decided session is not changed."""
    from services.common.errors import ServiceError
    from tests.mfa.test_otp_sms import enrol, session, submit

    s = session(orch, enrol(orch, sid="cust-late-otp"))
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    assert submit(orch, s.session_id, outbox_codes(orch.rt.settings)[-1]).result.passed
    check, decided = orch.lockouts.check, list[F.DecideResponse]()

    def decided_meanwhile(*args, **kw):
        if not decided:
            decided.append(orch.decide(F.DecideRequest(session_id=s.session_id), caller=SYSTEM))
        return check(*args, **kw)
    monkeypatch.setattr(orch.lockouts, "check", decided_meanwhile)
    before, sent = orch.sessions.get(s.session_id), len(outbox_codes(orch.rt.settings))
    with pytest.raises(ServiceError) as err:
        orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    assert decided[0].outcome == F.OUTCOME_ALLOW and err.value.reason == "SESSION_DECIDED"
    assert len(outbox_codes(orch.rt.settings)) == sent
    after = orch.sessions.get(s.session_id)
    assert after.state.otp_sent_at == before.state.otp_sent_at and after.state.decision is not None


def test_one_push_approval_sent_twice_at_once_counts_once(push_env):
    """The app's signed approval, released twice together: one counts, the copy is refused
    PUSH_ALREADY_ANSWERED in the compare-and-swap, with nothing written for it."""
    from tests.mfa.pushapp import PushApp, customer, shown_fields
    from tests.mfa.test_push import confirm, send, web_payment

    harness, stub, orch = push_env
    app = PushApp("inst-raced-approval")
    ref = customer(stub, harness.settings, "cust-raced-approval", app)
    s = web_payment(stub, app, ref)
    sent = send(stub, s)
    answer = app.answer(shown_fields(stub, harness.settings, app, sent.confirmation_id), sent.number)
    results = race(2, lambda i: confirm(stub, s, answer))
    passed = [r for r in results if not isinstance(r, grpc.RpcError)]
    refused = [details_of(r)["reason"] for r in results if isinstance(r, grpc.RpcError)]
    assert len(passed) == 1 and isinstance(passed[0], F.ConfirmTransactionResponse) and passed[0].result.passed, results
    assert refused == ["PUSH_ALREADY_ANSWERED"], results
    assert stored_factors(harness.settings, s.session_id) == [("push", True)]
    assert factor_audits(harness.settings, s.session_id) == 1


def allowed_with_push_out(push_env, name: str):
    """A session allowed on the bound device's key and an SMS code while its push confirmation is
    still out (a SIM swap): (the session, the customer's app, the subject, the fields it shows)."""
    from tests.mfa.pushapp import PushApp, customer, otp, shown_fields, start

    harness, stub, _ = push_env
    app = PushApp(f"inst-{name}")
    ref = customer(stub, harness.settings, f"cust-{name}", app)
    s = start(stub, app, ref, action="change_phone")
    sent = stub.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=s.session_id))
    fields = shown_fields(stub, harness.settings, app, sent.confirmation_id)
    assert stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s))).result.passed
    assert otp(stub, harness.settings, s.session_id).result.passed
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
    return s, app, ref, fields


def test_a_deny_that_arrives_after_the_session_was_allowed_still_flags_the_fraud(push_env):
    """The push is out; the session is allowed meanwhile on other factors (the device key and an
    SMS code: a SIM swap). The customer's signed "not me" then comes too late to change the
    decision, and is refused SESSION_DECIDED, but the fraud signal must not be lost: the subject
    is flagged and the flag audited. A deny that is not the customer's (badly signed) flags nothing."""
    from tests.mfa.pushapp import PushApp

    _, stub, orch = push_env
    s, app, ref, fields = allowed_with_push_out(push_env, "late-deny")
    forged = app.answer(fields, "", answer="deny")
    forged.signature = PushApp("inst-late-thief").sign(forged.context)
    for answer in (forged, app.answer(fields, "", answer="deny")):
        with pytest.raises(grpc.RpcError) as err:
            stub.ConfirmTransaction(F.ConfirmTransactionRequest(session_id=s.session_id, answer=answer))
        assert details_of(err.value)["reason"] == "SESSION_DECIDED"
        flag = orch.store.subject_signals.get(ref.tenant_id, ref.subject_id)
        flagged = [r for r in orch.rt.storage.audit.iter_records()
                   if r.event_type == "mfa.fraud_flagged" and s.session_id in r.details]
        if answer is forged:
            assert (flag is None or flag.flagged_at is None) and not flagged
    assert flag is not None and flag.flagged_at is not None and flag.flag_reason == "PUSH_DENIED"
    assert len(flagged) == 1 and json.loads(flagged[0].details)["after_decision"] == "allow"
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW  # not changed


def test_a_late_deny_sent_again_or_raced_is_audited_once(push_env):
    """The customer's late "not me" is flagged and audited once. The same signed answer sent again
    (an app retrying, an attacker replaying it) was flagged and audited again each time, growing the
    audit trail without bound; now the copy is refused SESSION_DECIDED as before and writes nothing,
    sent after the first or released together with it."""
    _, stub, orch = push_env

    def late_deny(name: str):
        s, app, _, fields = allowed_with_push_out(push_env, name)
        request = F.ConfirmTransactionRequest(session_id=s.session_id, answer=app.answer(fields, "", answer="deny"))
        return s.session_id, lambda _=0: stub.ConfirmTransaction(request)

    def audited(session_id: str = "") -> int:
        return len([r for r in orch.rt.storage.audit.iter_records()
                    if not session_id or (r.event_type == "mfa.fraud_flagged" and session_id in r.details)])

    session_id, answer = late_deny("late-deny-again")
    for sent in range(1, 4):
        with pytest.raises(grpc.RpcError) as err:
            answer()
        assert details_of(err.value)["reason"] == "SESSION_DECIDED"
        if sent == 1:
            after_first = audited()
    assert audited(session_id) == 1 and audited() == after_first

    session_id, answer = late_deny("late-deny-raced")
    results = race(3, answer)
    assert all(isinstance(r, grpc.RpcError) and details_of(r)["reason"] == "SESSION_DECIDED" for r in results), results
    assert audited(session_id) == 1


def test_a_p256_proof_re_encoded_or_malleated_is_still_the_same_proof(stub, mfa_server):
    """An ECDSA signature has other byte forms that verify (raw r||s instead of DER, s replaced by
    n - s): a copy in another form is the same proof of the same device over the same context."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # the order of P-256
    ref = setup_subject(stub, subject(TENANT, "cust-replay-p256"))
    app = bind(stub, mfa_server.settings, App(ec=True), ref=ref)
    s = start(stub, app, ref=ref)
    proof = app.proof(s)
    assert stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=proof)).result.passed
    r_, s_ = decode_dss_signature(proof.signature)
    copies = [F.DeviceProof(device_id=app.device_id, context=proof.context,
                            signature=r_.to_bytes(32, "big") + s_.to_bytes(32, "big")),
              F.DeviceProof(device_id=app.device_id, context=proof.context, signature=encode_dss_signature(r_, n - s_))]
    for copy in copies:
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=copy))
        assert details_of(err.value)["reason"] == "DEVICE_ALREADY_PROVEN"
    assert stored_factors(mfa_server.settings, s.session_id) == [("device", True)]
