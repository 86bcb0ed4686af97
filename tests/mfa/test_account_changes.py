"""Account changes as actions of their own (change_phone, reset_password, bind_device,
change_limits) and the SIM-swap cooling-off, through a real MFA server on loopback (SQLite and
PostgreSQL): after a phone change or a second device's binding, a payment the bound device and
the SMS code would allow steps up, until the window has passed."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import details_of
from services.mfa.config import MfaConfig
from services.mfa.policy.loader import load_policy
from services.mfa.policy.schema import BIOMETRIC
from tests.mfa.pushapp import PAYEE, F, PushApp, customer, held_clock, otp, push_server, start

ACCOUNT_CHANGES = ("change_phone", "reset_password", "bind_device", "change_limits")


def test_the_default_policy_holds_account_changes_to_a_bound_device_and_a_second_channel():
    policy = load_policy(MfaConfig().default_policy)
    for action in ACCOUNT_CHANGES:
        rule = policy.actions[action]
        for s in rule.acceptable:
            assert {"device", "push"} & set(s), (action, s)  # a bound-device factor
            assert (BIOMETRIC | {"sms_otp", "push"}) & (set(s) - {"device"}), (action, s)  # and another channel
            assert len(s) >= 2
    assert all(("push" in s) for s in policy.actions["bind_device"].acceptable)  # the old device confirms
    assert {"payment", "change_limits"} <= set(policy.cooling_off.actions) and policy.cooling_off.window_s > 0
    assert policy.cooling_off.requirement.min_independent == 2


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(request, tmp_path_factory):
    with push_server(tmp_path_factory.mktemp(f"changes-{request.param}"), request.param) as running:
        yield running


@pytest.fixture
def clock(env):
    with held_clock(env[2]) as c:
        yield c


def pay(stub, settings, app, ref):
    """A payment on the bound phone with its key and the SMS code: (risk reason codes, decision)."""
    s = start(stub, app, ref, action="payment", amount=50000)
    stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s)))
    otp(stub, settings, s.session_id, payee=PAYEE)
    return [r.code for r in s.risk.reasons], stub.Decide(F.DecideRequest(session_id=s.session_id))


def test_a_payment_inside_the_cooling_off_after_a_phone_change_steps_up(env, clock):
    harness, stub, _ = env
    app = PushApp("inst-sim-swap")
    ref = customer(stub, harness.settings, "cust-sim-swap", app)
    reasons, d = pay(stub, harness.settings, app, ref)
    assert d.outcome == F.OUTCOME_ALLOW and "RECENT_PHONE_CHANGE" not in reasons  # control

    s = start(stub, app, ref, action="change_phone")  # the old number's code and the bound key
    stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s)))
    otp(stub, harness.settings, s.session_id)
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
    stub.SetPhoneNumber(F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613900139000"))

    reasons, d = pay(stub, harness.settings, app, ref)
    assert "RECENT_PHONE_CHANGE" in reasons
    assert d.outcome == F.OUTCOME_STEP_UP
    assert all(F.FACTOR_TYPE_FACE in s.factors for s in d.still_needed)  # the new SIM alone is not enough

    clock.advance(86400 + 1)
    reasons, d = pay(stub, harness.settings, app, ref)
    assert "RECENT_PHONE_CHANGE" not in reasons and d.outcome == F.OUTCOME_ALLOW


def test_setting_the_same_number_again_is_no_change(env):
    harness, stub, orch = env
    app = PushApp("inst-same-number")
    ref = customer(stub, harness.settings, "cust-same-number", app)
    stub.SetPhoneNumber(F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"))  # as before
    reasons, d = pay(stub, harness.settings, app, ref)
    assert "RECENT_PHONE_CHANGE" not in reasons and d.outcome == F.OUTCOME_ALLOW


def test_a_payment_from_a_newly_bound_second_device_steps_up(env):
    harness, stub, _ = env
    first, second = PushApp("inst-old-phone"), PushApp("inst-new-phone")
    ref = customer(stub, harness.settings, "cust-new-phone", first)
    reasons, d = pay(stub, harness.settings, first, ref)
    assert "RECENT_DEVICE_BINDING" not in reasons and d.outcome == F.OUTCOME_ALLOW  # a first device: no cooling-off
    customer(stub, harness.settings, "cust-new-phone", second)
    reasons, d = pay(stub, harness.settings, second, ref)
    assert "RECENT_DEVICE_BINDING" in reasons and d.outcome == F.OUTCOME_STEP_UP
    reasons, d = pay(stub, harness.settings, first, ref)  # the old phone is not the new channel
    assert "RECENT_DEVICE_BINDING" not in reasons and d.outcome == F.OUTCOME_ALLOW


def test_a_phone_change_needs_more_than_the_sms_code(env):
    harness, stub, _ = env
    app = PushApp("inst-change-otp")
    ref = customer(stub, harness.settings, "cust-change-otp", app)
    s = start(stub, app, ref, action="change_phone")
    otp(stub, harness.settings, s.session_id)
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_STEP_UP


def test_a_second_device_is_bound_only_in_a_bind_device_session_confirmed_on_the_first(env):
    from tests.mfa.pushapp import BIND_TENANT, bind, shown_fields

    harness, stub, _ = env
    old, new = PushApp("inst-bind-old"), PushApp("inst-bind-new")
    ref = customer(stub, harness.settings, "cust-bind", old, tenant=BIND_TENANT)  # a first device: any strong login
    with pytest.raises(grpc.RpcError) as err:  # a login on the new phone with the (maybe swapped) SIM's code
        bind(stub, harness.settings, ref, new)
    assert details_of(err.value)["reason"] == "BIND_DEVICE_ACTION_REQUIRED"

    s = start(stub, new, ref, action="bind_device")
    sent = stub.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=s.session_id))
    assert sent.sent and sent.device_id == old.device_id  # the old phone is asked
    fields = shown_fields(stub, harness.settings, old, sent.confirmation_id)
    assert fields["action"] == "bind_device" and fields["shown"]["device"] == "new"
    stub.ConfirmTransaction(F.ConfirmTransactionRequest(session_id=s.session_id, answer=old.answer(fields, sent.number)))
    otp(stub, harness.settings, s.session_id)
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
    new.device_id = stub.RegisterDevice(F.RegisterDeviceRequest(
        session_id=s.session_id, device=new.device, public_key=new.public_der, label="new phone")).device_id
    assert new.device_id
