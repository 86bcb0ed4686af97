"""Lockout that cannot be turned against the customer (NIST SP 800-63B-4 § 3.2.2): growing delays
and a bounded lock, counted per subject and per device, charged before an attempt is evaluated
(concurrent wrong attempts never evaluate more than the limit), and a factor after the decision
refused in the transaction that checks it."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from services.common.api.v1 import mfa_pb2
from services.common.errors import ServiceError, details_of
from services.common.context import SYSTEM
from tests.conftest import present, race
from tests.mfa.conftest import App, outbox_codes, phone_device, setup_subject, subject
from tests.mfa.test_flows import bind, otp_round, start

F = mfa_pb2
TENANT = "bind-bank"  # lockout {max_failures: 5, delay_after: 3, delay_s: 0}; OTP codes take 10 tries


def audit_events(settings, event: str) -> list[dict]:
    from services.common.storage import open_storage

    store = open_storage(settings.storage_dsn)
    try:
        return [json.loads(r.details) for r in store.audit.iter_records() if r.event_type == event]
    finally:
        store.close()


def outcome(result):
    """("evaluated", passed) for a factor result, ("refused", reason) for a status."""
    if isinstance(result, grpc.RpcError):
        return "refused", details_of(result)["reason"]
    return "evaluated", result.result.passed


def test_concurrent_wrong_device_proofs_evaluate_at_most_the_limit(stub, mfa_server):
    """30 proofs by a thief's key, each in its own session on the bound device, released together:
    five are evaluated (the limit), the others are refused before evaluation."""
    ref = setup_subject(stub, subject(TENANT, "cust-race-dev"))
    app = bind(stub, mfa_server.settings, App(), ref=ref)
    thief = App(app.device)
    thief.device_id, thief.shown = app.device_id, app.shown
    sessions = [start(stub, app, ref=ref) for _ in range(30)]
    results = race(30, lambda i: stub.SubmitFactor(F.SubmitFactorRequest(
        session_id=sessions[i].session_id, device=thief.proof(sessions[i]))))
    seen = [outcome(r) for r in results]
    assert seen.count(("evaluated", False)) == 5, seen
    assert {o for o in seen if o[0] == "refused"} == {("refused", "DEVICE_LOCKED")}
    ids = {s.session_id for s in sessions}
    assert len([e for e in audit_events(mfa_server.settings, "mfa.factor") if e["session_id"] in ids]) == 5
    assert len(audit_events(mfa_server.settings, "mfa.device_locked")) == 1


def test_concurrent_wrong_codes_evaluate_at_most_the_limit(stub, mfa_server):
    """30 wrong codes in one session of a new device (the OTP itself would take 10): the subject's
    five are evaluated, the rest refused."""
    ref = setup_subject(stub, subject(TENANT, "cust-race-otp"))
    s = start(stub, ref=ref)
    stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
    wrong = f"{(int(outbox_codes(mfa_server.settings)[-1]) + 1) % 10 ** 6:06d}"
    results = race(30, lambda i: stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id,
                                                                          otp=F.OtpEvidence(code=wrong))))
    seen = [outcome(r) for r in results]
    assert seen.count(("evaluated", False)) == 5, seen
    assert {o for o in seen if o[0] == "refused"} == {("refused", "SUBJECT_LOCKED")}
    assert len([e for e in audit_events(mfa_server.settings, "mfa.factor") if e["session_id"] == s.session_id]) == 5


def test_failures_from_elsewhere_lock_the_subject_but_not_the_customer_on_the_bound_device(stub, mfa_server):
    settings = mfa_server.settings
    ref = setup_subject(stub, subject(TENANT, "cust-target"))
    app = bind(stub, settings, App(), ref=ref)
    # An attacker who knows the subject id, on devices of their own, fails five codes.
    s = start(stub, App(phone_device(install="attacker-1")), ref=ref)
    stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
    wrong = f"{(int(outbox_codes(settings)[-1]) + 1) % 10 ** 6:06d}"
    for _ in range(5):
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=wrong)))
    with pytest.raises(grpc.RpcError) as err:
        start(stub, App(phone_device(install="attacker-2")), ref=ref)  # another device of the attacker
    assert details_of(err.value)["reason"] == "SUBJECT_LOCKED" and "bound device" in (err.value.details() or "")
    # The customer on their bound phone is not locked out: the failures raised the risk (a second
    # factor), and the ALLOW clears the counters.
    mine = start(stub, app, ref=ref)
    assert "FAILED_ATTEMPTS" in [x.code for x in mine.risk.reasons]
    r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=mine.session_id, device=app.proof(mine)))
    assert r.result.passed
    assert stub.Decide(F.DecideRequest(session_id=mine.session_id)).outcome == F.OUTCOME_STEP_UP
    otp_round(stub, settings, mine.session_id)
    d = stub.Decide(F.DecideRequest(session_id=mine.session_id))
    assert d.outcome == F.OUTCOME_ALLOW, d
    assert start(stub, App(phone_device(install="attacker-3")), ref=ref).session_id  # reset by the ALLOW


def test_a_locked_subject_on_a_bound_device_must_prove_the_key_before_a_decision(orch, clock):
    """A session that only claims the bound device's attributes (a copied install id) gets no
    decision while the subject is locked unless the bound key is proven."""
    from services.mfa import subjects

    ref = subject(TENANT, "cust-claim")
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"), caller=SYSTEM)
    app = _bound_in_process(orch, ref)
    orch.store.lockouts.record_failure(TENANT, "subject", ref.subject_id, ref.subject_id, 1000)
    req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device)
    s = app.opened(req, orch.start(req, caller=SYSTEM))  # not refused: it claims the bound device
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    orch.submit(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=outbox_codes(orch.rt.settings)[-1])), caller=SYSTEM)
    d = orch.decide(F.DecideRequest(session_id=s.session_id), caller=SYSTEM)
    assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "SUBJECT_LOCKED"
    s = app.opened(req, orch.start(req, caller=SYSTEM))  # the same, and the bound key proven
    orch.submit(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s)), caller=SYSTEM)
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    orch.submit(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=outbox_codes(orch.rt.settings)[-1])), caller=SYSTEM)
    assert orch.decide(F.DecideRequest(session_id=s.session_id), caller=SYSTEM).outcome == F.OUTCOME_ALLOW


def _bound_in_process(orch, ref):
    from services.mfa import devices
    from services.mfa.storage import DeviceRecord

    app = App()
    dev = devices.canonical(app.device, orch._device_key, ref.tenant_id)
    app.device_id = orch.store.devices.add(DeviceRecord(ref.tenant_id, ref.subject_id, dev.fingerprint,
                                                        app.public_der, dev.soft, "phone", "android")).id
    return app


LOCK_POLICY = """\
version: lock-test-1
factors:
  sms_otp: {resend_cooldown_s: 0, max_attempts: 10}
actions:
  login: {required: 3.0, acceptable: [[sms_otp], [device]]}
lockout: {max_failures: 5, delay_after: 3, delay_s: 5.0, subject_lock_s: 900, device_lock_s: 3600}
"""


def test_delays_grow_then_the_lock_is_bounded_and_an_admin_may_lift_it_sooner(orch, clock):
    from services.mfa import subjects

    (orch.policies.policy_dir / "lock-bank.yaml").write_text(LOCK_POLICY)
    ref = subject("lock-bank", "cust-slow")
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"), caller=SYSTEM)
    req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=App().device)
    s = orch.start(req, caller=SYSTEM)
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    wrong = f"{(int(outbox_codes(orch.rt.settings)[-1]) + 1) % 10 ** 6:06d}"

    def attempt():
        try:
            return orch.submit(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=wrong)), caller=SYSTEM)
        except ServiceError as err:
            return err

    waits = []
    for _ in range(5):
        r = attempt()
        while isinstance(r, ServiceError):
            assert r.reason == "THROTTLED", r
            waits.append(int(r.metadata["retry_after_s"]))
            clock.advance(waits[-1])
            r = attempt()
    assert waits == [5, 10]  # from the third failure on, each wait doubles
    err = attempt()
    assert isinstance(err, ServiceError) and err.reason == "SUBJECT_LOCKED"
    elsewhere = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login",
                                             device=phone_device(install="another-phone"))
    for wait, locked in ((890, True), (20, False)):  # the subject's lock lasts subject_lock_s (900 s)
        clock.advance(wait)
        try:
            orch.start(elsewhere, caller=SYSTEM)
            assert not locked
        except ServiceError as exc:
            assert locked and exc.reason == "SUBJECT_LOCKED"
    with pytest.raises(ServiceError) as refused:  # the device the failures came from: device_lock_s (3600 s)
        orch.start(req, caller=SYSTEM)
    assert refused.value.reason == "DEVICE_LOCKED"
    orch.store.lockouts.record_failure("lock-bank", "subject", ref.subject_id, ref.subject_id, 1000, clock())
    with pytest.raises(ServiceError) as refused:
        orch.start(elsewhere, caller=SYSTEM)
    assert refused.value.reason == "SUBJECT_LOCKED"
    orch.unlock(F.UnlockSubjectRequest(subject=ref, reason="identity-verified"), caller=SYSTEM)  # the subject and its devices
    assert orch.start(elsewhere, caller=SYSTEM).session_id and orch.start(req, caller=SYSTEM).session_id


def test_a_factor_racing_the_decision_is_in_it_or_refused_never_after_it(stub, mfa_server):
    """Decide and SubmitFactor released together, ten times: either the factor is refused with
    SESSION_DECIDED, or the decision counted it; the stored session never holds a factor its
    decision did not weigh."""
    from services.common.storage import open_storage
    from services.mfa.fusion import decide
    from services.mfa.state import SessionState
    from services.mfa.storage import attach

    settings = mfa_server.settings
    ref = setup_subject(stub, subject(TENANT, "cust-race-decide"))
    app = bind(stub, settings, App(), ref=ref)
    store = open_storage(settings.storage_dsn)
    seen = set()
    try:
        for _ in range(10):
            s = start(stub, app, ref=ref)
            assert stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s))).result.passed
            stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
            code = outbox_codes(settings)[-1]

            def call(i: int, session_id: str = s.session_id, code: str = code) -> Any:
                if i == 0:
                    return stub.Decide(F.DecideRequest(session_id=session_id))
                return stub.SubmitFactor(F.SubmitFactorRequest(session_id=session_id, otp=F.OtpEvidence(code=code)))

            decided, submitted = race(2, call)
            assert decided is not None and not isinstance(decided, Exception), decided
            assert decided.outcome == F.OUTCOME_ALLOW
            st = SessionState.from_json(dict(present(attach(store).auth_sessions.get(s.session_id)).state))
            assert st.decision is not None
            again = decide(st.plan, st.factors)
            assert (list(again.amr), again.total) == (list(st.decision.amr), st.decision.total)
            if isinstance(submitted, grpc.RpcError):
                assert details_of(submitted)["reason"] == "SESSION_DECIDED"
                assert [f.factor for f in st.factors] == ["device"] and "sms" not in decided.amr
                seen.add("refused")
            else:
                assert [f.factor for f in st.factors] == ["device", "sms_otp"] and "sms" in decided.amr
                seen.add("counted")
    finally:
        store.close()
    assert seen  # which side won each race is the scheduler's choice; both keep the invariant


@pytest.mark.parametrize("change", ["unlock", "revoke"])
def test_an_admin_change_whose_audit_record_fails_is_not_made(orch, change, monkeypatch):
    """Unlocking a subject and revoking a device land with their audit record or not at all."""
    ref = subject("lock-bank", f"cust-audit-{change}")
    orch.store.lockouts.record_failure("lock-bank", "subject", ref.subject_id, ref.subject_id, 1000, orch.clock())
    app = _bound_in_process(orch, ref)

    def audit_down(*_args, **_kwargs):
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(orch.rt.audit, "append", audit_down)
    with pytest.raises(RuntimeError):
        if change == "unlock":
            orch.unlock(F.UnlockSubjectRequest(subject=ref, reason="identity-verified"), caller=SYSTEM)
        else:
            orch.revoke_device(F.RevokeDeviceRequest(subject=ref, device_id=app.device_id), caller=SYSTEM)
    assert orch.store.lockouts.get("lock-bank", "subject", ref.subject_id) is not None
    assert orch.store.devices.get("lock-bank", app.device_id).revoked_at is None


def test_invented_device_fingerprints_keep_a_bounded_number_of_counters_never_the_customers_phone(
        storage_dsn, tmp_path):
    """A device's lock of 0 s lasts until an administrator unlocks, and a locked counter is never
    purged: a fingerprint per lock of the subject added a row forever. The subject's own counter
    and the counter of a device bound to it are never what gives way, and each counter that does
    is audited with the charge that dropped it (it is evidence: a locked device forgotten)."""
    from datetime import datetime, timedelta, timezone

    from services.common.audit import AuditLog, AuditSigner
    from services.common.privacy import Pseudonymizer
    from services.common.storage import open_storage
    from services.mfa.lockout import Lockouts
    from services.mfa.policy.schema import Lockout
    from services.mfa.storage import DeviceRecord, attach

    storage = open_storage(storage_dsn)
    try:
        store = attach(storage)
        audit = AuditLog(storage.audit, AuditSigner.load_or_create(tmp_path / "audit.pem"), Pseudonymizer(b"p" * 32))
        lockouts = Lockouts(store, audit)
        cap = 4
        p = Lockout(max_failures=5, delay_after=3, delay_s=0, subject_lock_s=60, device_lock_s=0,
                    device_counters_per_subject=cap)
        now = datetime(2031, 5, 4, tzinfo=timezone.utc)
        store.devices.add(DeviceRecord("bank-a", "cust", "fp-phone"))
        for _ in range(5):  # a thief locks the customer's phone
            now += timedelta(seconds=1)
            lockouts.attempt("bank-a", "cust", "fp-phone", p, now, True, "mfa-test")
        for n in range(3 * cap):  # then invents devices, waiting out each subject lock
            for _ in range(5):
                now += timedelta(seconds=61)
                lockouts.attempt("bank-a", "cust", f"fp-invented-{n}", p, now, False, "mfa-test")
        with storage.db.read() as s:
            rows = s.one("SELECT COUNT(*) FROM mfa_lockouts WHERE scope = 'device' AND subject_id = 'cust'")[0]
        assert rows == cap + 1  # the newest invented ones, and the phone
        with pytest.raises(ServiceError, match="device is locked"):
            lockouts.check("bank-a", "cust", "fp-phone", p, now, bound=True)
        with pytest.raises(ServiceError, match="subject is locked"):  # the last invented device's 5th failure
            lockouts.check("bank-a", "cust", "fp-invented-new", p, now, bound=False)
        with pytest.raises(ServiceError, match="device is locked"):
            lockouts.check("bank-a", "cust", f"fp-invented-{3 * cap - 1}", p, now + timedelta(seconds=61), bound=False)
        dropped = [r for r in storage.audit.iter_records() if r.event_type == "mfa.device_counters_dropped"]
        # Each new invented device beyond the cap dropped the oldest one, locked.
        assert [json.loads(r.details) for r in dropped] == [{"dropped": 1, "locked": 1, "kept": cap}] * (2 * cap)
        assert {(r.actor, r.tenant_id, r.subject_pseudonym) for r in dropped} == {
            ("mfa-test", "bank-a", Pseudonymizer(b"p" * 32).pseudonymize("bank-a", "cust"))}
    finally:
        storage.close()

