"""Typed session state (sessions stored as the untyped dict still load and carry on) and the one
path every factor's challenge takes (SMS OTP, face liveness, voice digits), in-process on SQLite
and PostgreSQL. With the real face and voice services: tests/mfa/test_e2e.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import grpc
import pytest

from services.common import context
from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.context import SYSTEM, Principal
from services.common.errors import ServiceError
from services.mfa import subjects
from services.mfa.state import SessionState
from services.mfa.storage import AuthSessionRecord
from tests.conftest import present
from tests.mfa.conftest import App, outbox_codes

F = mfa_pb2
SID = "ses_" + "5e" * 16
PHONE = "+8613800135678"

# A session as the orchestrator stored it while its state was a free-form dict: written out here,
# not made by the code under test. A wrong OTP already counted (a factor entry of that time has no
# "c" key), the client's place kept for the decision.
OLD_STATE: dict[str, Any] = {
    "channel": "app", "action": "login", "amount": None,
    "device": {"fp": "dfp-0123", "state": "unbound", "device_id": None},
    "nonce": "n0nce-0f-the-old-session", "policy_version": "otp-test-1",
    "risk": {"score": 10.0, "level": "low", "reasons": [["UNBOUND_DEVICE", "the subject has no bound device"]]},
    "plan": {"required": 3.0, "min_factors": 0, "sets": [["sms_otp"], ["device"]], "degraded_sets": [],
             "degraded_required": 0.0, "degraded": [], "review": False, "deny": False, "review_reasons": []},
    "factors": [{"f": "sms_otp", "p": False, "l": 0.0, "v": False, "d": False, "u": False, "pad": False,
                 "r": [["OTP_WRONG", "the code is wrong"]]}],
    "challenges": {}, "otp_sent_at": None, "place": ["CN", 31.23, 121.47], "decision": None,
    "request_hash": None,
}
OLD_DECISION = {"outcome": "allow", "reasons": [["EVIDENCE", "total 3.00 of 3.00 required; passed: sms_otp"]],
                "total": 3.0, "still_needed": [], "amr": ["sms"], "acr": "aal1", "review_id": "",
                "token": "eyJhbGciOiJFZERTQSJ9.e30.c2ln", "at": "2031-05-04T12:00:00.123456+00:00"}


def ref(tenant="otp-bank", sid="cust-0001") -> common_pb2.SubjectRef:
    return common_pb2.SubjectRef(tenant_id=tenant, subject_id=sid)


def store_old(orch, clock, state, session_id=SID):
    orch.store.auth_sessions.create(AuthSessionRecord("otp-bank", "cust-0001", state,
                                                      clock() + timedelta(minutes=10), id=session_id))


def test_a_session_stored_as_the_untyped_dict_loads_and_carries_on(orch, clock):
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref(), phone_e164=PHONE), caller=SYSTEM)
    store_old(orch, clock, OLD_STATE)
    parsed = orch.sessions.get(SID).state
    assert parsed.plan.sets == (("sms_otp",), ("device",)) and parsed.place == ("CN", 31.23, 121.47)
    assert [(f.factor, f.passed, f.capture_error) for f in parsed.factors] == [("sms_otp", False, False)]
    again = parsed.to_json()  # the same shape is written back: an older release reads it
    assert again == {**OLD_STATE, "factors": [{**OLD_STATE["factors"][0], "c": False}]}

    orch.send_otp(F.SendOtpRequest(session_id=SID), caller=SYSTEM)
    r = orch.submit(F.SubmitFactorRequest(session_id=SID, otp=F.OtpEvidence(code=outbox_codes(orch.rt.settings)[-1])), caller=SYSTEM)
    assert r.result.passed
    d = orch.decide(F.DecideRequest(session_id=SID), caller=SYSTEM)
    assert d.outcome == F.OUTCOME_ALLOW and d.total_llr == 3.0
    stored = dict(orch.store.auth_sessions.get(SID).state)
    # what a submission adds (the session's count of them) is a key an older release's from_json skips
    assert stored.keys() == OLD_STATE.keys() | {"submissions"} and stored["submissions"] == 1
    assert stored["decision"]["outcome"] == "allow"
    assert [f["p"] for f in stored["factors"]] == [False, True]
    assert orch.store.subject_signals.get("otp-bank", "cust-0001").country == "CN"  # the old place was used


def test_an_old_decided_session_answers_its_decision_and_refuses_more_factors(orch, clock):
    store_old(orch, clock, {**OLD_STATE, "decision": OLD_DECISION, "otp_sent_at": "2031-05-04T11:59:00+00:00"})
    d = orch.decide(F.DecideRequest(session_id=SID), caller=SYSTEM)
    assert (d.outcome, d.token, d.acr, list(d.amr)) == (F.OUTCOME_ALLOW, OLD_DECISION["token"], "aal1", ["sms"])
    with pytest.raises(ServiceError) as err:
        orch.send_otp(F.SendOtpRequest(session_id=SID), caller=SYSTEM)
    assert err.value.reason == "SESSION_DECIDED"
    assert present(SessionState.from_json(dict(orch.store.auth_sessions.get(SID).state)).decision).at.minute == 0


def start(orch, tenant, channel=F.CHANNEL_APP):
    return orch.start(F.StartAuthenticationRequest(subject=ref(tenant), channel=channel, action="login",
                                                   device=App().device), caller=SYSTEM)


def challenge(orch, name, session_id):
    try:
        if name == "sms_otp":
            return orch.send_otp(F.SendOtpRequest(session_id=session_id), caller=SYSTEM)
        modality = {"face": common_pb2.MODALITY_FACE, "voice": common_pb2.MODALITY_VOICE}[name]
        return orch.start_challenge(F.StartBiometricChallengeRequest(session_id=session_id, modality=modality), caller=SYSTEM)
    except ServiceError as err:
        return err


def test_every_factor_challenge_is_refused_alike_for_a_locked_subject_and_an_unacceptable_factor(orch):
    """One path: the same checks, in the same order, before any factor issues anything."""
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref("bank-b"), phone_e164=PHONE), caller=SYSTEM)
    s = start(orch, "bank-b")  # the default policy: face, voice and SMS OTP all acceptable
    orch.store.lockouts.record_failure("bank-b", "subject", "cust-0001", "cust-0001", 1000)
    face_calls = orch.clients["face"].breaker._failures
    for name in ("sms_otp", "face", "voice"):
        err = challenge(orch, name, s.session_id)
        assert isinstance(err, ServiceError) and err.reason == "SUBJECT_LOCKED", (name, err)
    assert outbox_codes(orch.rt.settings) == [] and orch.clients["face"].breaker._failures == face_calls

    s = start(orch, "otp-bank")  # SMS OTP and device only
    for name in ("face", "voice"):
        err = challenge(orch, name, s.session_id)
        assert isinstance(err, ServiceError) and err.code == grpc.StatusCode.FAILED_PRECONDITION, name
        assert err.reason == "FACTOR_NOT_ACCEPTABLE" and f"{name} is not an acceptable factor" in err.message


def test_the_orchestrator_confines_a_terminal_by_the_caller_it_is_given_not_by_rpc_state(orch):
    """The servicer hands the RPC's principal to the orchestrator with the request; the session layer
    reads no RPC state (Sessions.load read the principal from the RPC's context variable). A kiosk
    terminal given as the caller is refused an app session's code and decision before anything is
    sent; the bank's back end given as the caller passes, whatever principal the context holds."""
    kiosk = Principal("kiosk-7", frozenset({"orchestrator"}), frozenset({"otp-bank"}), terminal_channel="kiosk")
    bank = Principal("bank-backend", frozenset({"orchestrator"}), frozenset({"*"}))
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref("otp-bank"), phone_e164=PHONE), caller=SYSTEM)
    s = start(orch, "otp-bank")
    for call in (lambda: orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=kiosk),
                 lambda: orch.decide(F.DecideRequest(session_id=s.session_id), caller=kiosk)):
        with pytest.raises(ServiceError) as err:
            call()
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TERMINAL_NOT_REGISTERED")
    assert outbox_codes(orch.rt.settings) == []
    token = context.principal.set(kiosk)
    try:
        assert orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=bank).masked_phone
    finally:
        context.principal.reset(token)
    # and the audit record names the caller it was given, not the principal the context holds
    assert [r.actor for r in orch.rt.storage.audit.iter_records() if r.event_type == "mfa.otp_sent"] == ["bank-backend"]


def test_an_audited_write_off_the_rpc_thread_names_the_caller_it_is_given(orch):
    """Work handed to an executor or a callback runs without the RPC's context: an audit record
    written there named "system" (the actor was read from the RPC's context variable) instead of
    the real caller. The caller is a parameter, so the record names it on any thread."""
    bank = Principal("bank-backend", frozenset({"orchestrator"}), frozenset({"*"}))
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref("otp-bank"), phone_e164=PHONE), caller=SYSTEM)
    s = start(orch, "otp-bank")
    token = context.principal.set(bank)  # as in the RPC's own thread
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:  # a plain executor: the context does not follow
            assert pool.submit(orch.send_otp, F.SendOtpRequest(session_id=s.session_id), caller=bank).result()
    finally:
        context.principal.reset(token)
    actors = {r.event_type: r.actor for r in orch.rt.storage.audit.iter_records()}
    assert actors["mfa.otp_sent"] == "bank-backend"
    assert actors["mfa.session_started"] == actors["contact.phone_set"] == "system"  # SYSTEM: in-process


def test_a_biometric_challenge_whose_service_is_down_degrades_the_session_like_sms_fails_cleanly(orch, clock):
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref("bank-b"), phone_e164=PHONE), caller=SYSTEM)
    sessions = {name: start(orch, "bank-b") for name in ("face", "voice")}
    for name, s in sessions.items():
        err = challenge(orch, name, s.session_id)
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == f"{name.upper()}_SERVICE_UNAVAILABLE"
        state = orch.sessions.get(s.session_id).state
        assert state.plan.degraded == (name,) and state.challenges == {}  # nothing was handed out
        assert all(name not in s for s in state.plan.sets)
        sent = challenge(orch, "sms_otp", s.session_id)  # the other biometric with SMS OTP remains
        assert isinstance(sent, F.SendOtpResponse) and sent.masked_phone.endswith("5678")
        state = orch.sessions.get(s.session_id).state
        assert state.otp_sent_at == clock() and state.challenges == {}
    events = [r.event_type for r in orch.rt.storage.audit.iter_records()]
    assert events.count("mfa.otp_sent") == 2

    # The claim is given back when the code cannot be sent: an immediate retry is not cooled down.
    subjects_without_phone = start(orch, "bank-c")
    err = challenge(orch, "sms_otp", subjects_without_phone.session_id)
    assert err.reason == "NO_PHONE" and orch.sessions.get(subjects_without_phone.session_id).state.otp_sent_at is None


def test_a_session_takes_a_bounded_number_of_submissions_passed_or_not(mfa_settings, clock):
    """Passed attempts are not charged to the lockout, so only this bound stops a client from
    resubmitting evidence (each a factor check, for a biometric the models) into one session: past
    Policy.session.max_submissions even the right code is refused, before anything is written, and
    two submissions racing for the last place get one."""
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare
    from tests.conftest import race
    from tests.mfa.conftest import OTP_POLICY
    from tests.mfa.test_lockout import audit_events
    from tests.mfa.test_otp_sms import enrol, session, submit

    policy = (OTP_POLICY.replace("version: otp-test-1", "version: limit-test-1")  # failures are not what is tested
              .replace("lockout: {max_failures: 5, delay_after: 3", "lockout: {max_failures: 20, delay_after: 20")
              + "session: {max_submissions: 3}\n")
    (mfa_settings.mfa.policy_dir / "limit-bank.yaml").write_text(policy)
    prepare(mfa_settings)
    rt = Runtime.open(mfa_settings)
    orch = Orchestrator(rt, clock=clock)
    try:
        ref = enrol(orch, tenant="limit-bank")
        s = session(orch, ref)
        orch.send_otp(mfa_pb2.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
        code = outbox_codes(mfa_settings)[-1]
        wrong = "000000" if code != "000000" else "111111"
        assert not submit(orch, s.session_id, wrong).result.passed
        results = race(2, lambda i: submit(orch, s.session_id, wrong))  # both fit: 2 and 3 of 3
        assert all(r is not None and not isinstance(r, Exception) and not r.result.passed for r in results), results
        factors = len(audit_events(mfa_settings, "mfa.factor"))
        with pytest.raises(ServiceError) as err:
            submit(orch, s.session_id, code)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == "SESSION_LIMIT_REACHED"
        assert "3 factor submissions" in err.value.message
        assert len(audit_events(mfa_settings, "mfa.factor")) == factors
        assert present(orch.sessions.get(s.session_id)).state.submissions == 3

        last = session(orch, ref)  # at 2 of 3, two at once: one gets the last place
        orch.send_otp(mfa_pb2.SendOtpRequest(session_id=last.session_id), caller=SYSTEM)
        for _ in range(2):
            submit(orch, last.session_id, wrong)
        results = race(2, lambda i: submit(orch, last.session_id, wrong))
        refused = [r.reason for r in results if isinstance(r, ServiceError)]
        assert refused == ["SESSION_LIMIT_REACHED"], results
        assert present(orch.sessions.get(last.session_id)).state.submissions == 3
    finally:
        orch.close()
        rt.close()
