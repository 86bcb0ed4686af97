"""Push confirmation through a real MFA server on loopback (SQLite and PostgreSQL): a payment
started in a browser is confirmed on the customer's bound app, with number matching; every way an
answer can be wrong is refused with its reason; a deny ends the session and flags the subject; an
unreachable app falls back to the policy's factors, never to an ALLOW without one."""

from __future__ import annotations

import json

import grpc
import pytest

from services.common.errors import details_of
from services.mfa.push import FcmPushGateway
from tests.mfa.pushapp import (
    F, FcmServer, PushApp, browser, customer, held_clock, otp, push_server, pushes, shown_fields, start,
)

AMOUNT = 120000  # CNY 1,200.00


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(request, tmp_path_factory):
    with push_server(tmp_path_factory.mktemp(f"push-{request.param}"), request.param) as running:
        yield running


@pytest.fixture(scope="module")
def fcm():
    with FcmServer("bank-app", "ya29.test") as server:
        yield server


@pytest.fixture
def clock(env):
    with held_clock(env[2]) as c:
        yield c


def web_payment(stub, app, ref, amount=AMOUNT, metadata=()):
    """The customer pays from a browser (not a bound device) in France."""
    return start(stub, app, ref, action="payment", amount=amount, channel=F.CHANNEL_WEB, device=browser(),
                 country="FR", metadata=metadata)


def send(stub, s):
    return stub.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=s.session_id, payee=PAYEE))


def confirm(stub, s, answer):
    return stub.ConfirmTransaction(F.ConfirmTransactionRequest(session_id=s.session_id, answer=answer))


def reason(err: grpc.RpcError) -> str:
    return details_of(err)["reason"]


PAYEE = F.Payee(name="Li Lei", account_masked="6222 **** **** 1234")


def test_an_approval_with_the_number_the_screen_showed_allows_and_is_audited(env):
    harness, stub, orch = env
    app = PushApp("inst-approve")
    ref = customer(stub, harness.settings, "cust-approve", app)
    s = web_payment(stub, app, ref, metadata=(("x-request-id", "req-push-approve"),))
    sent = send(stub, s)
    assert sent.sent and sent.device_id == app.device_id and len(sent.number) == 2
    assert 0 < (sent.expires_at.ToDatetime() - orch.clock().replace(tzinfo=None)).total_seconds() <= 60
    message = pushes(harness.settings)[-1]
    assert message["token_sha256"] and app.push_token not in json.dumps(message)
    assert message["data"] == {"type": "biogate.confirm", "cid": sent.confirmation_id, "sid": s.session_id,
                               "request_id": "req-push-approve"}  # ids only: the provider sees no transaction
    stored = json.dumps(orch.store.auth_sessions.get(s.session_id).state, ensure_ascii=False)
    assert "sealed" in stored and "Li Lei" not in stored and "**** 1234" not in stored  # sealed, not in clear
    fields = shown_fields(stub, harness.settings, app, sent.confirmation_id)  # read from the MFA, signed
    assert "number" not in fields  # the screen has it, not the app
    assert fields["amount"] == {"cur": "CNY", "minor": AMOUNT} and fields["action"] == "payment"
    assert fields["payee"] == {"name": "Li Lei", "account": "6222 **** **** 1234"}
    assert fields["shown"] == {"channel": "web", "country": "FR", "device": "new"}

    r = confirm(stub, s, app.answer(fields, sent.number))
    assert r.result.passed and r.result.factor == F.FACTOR_TYPE_PUSH and r.result.binding == "device"
    assert [x.code for x in r.result.reasons] == ["PUSH_APPROVED"] and not r.HasField("decision")
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_ALLOW and "swk" in d.amr

    events = {}
    for row in orch.rt.storage.audit.iter_records():
        details = json.loads(row.details)
        if details.get("session_id") == s.session_id:
            events[row.event_type] = details
    assert {"mfa.session_started", "mfa.push_sent", "mfa.push_fetched", "mfa.factor", "mfa.decision"} <= set(events)
    assert events["mfa.push_sent"]["request_id"] == "req-push-approve"
    assert events["mfa.push_fetched"] == {"session_id": s.session_id, "confirmation_id": sent.confirmation_id,
                                          "device_id": app.device_id, "refused": "",
                                          "request_id": "req-push-approve"}
    assert events["mfa.push_sent"]["device_id"] == app.device_id
    factor = events["mfa.factor"]  # who confirmed what, on which device (the record's own time: when)
    assert factor["confirmation_id"] == sent.confirmation_id and factor["device_id"] == app.device_id
    assert factor["answer"] == "approve" and factor["reasons"] == ["PUSH_APPROVED"]


def test_through_fcm_the_provider_sees_ids_only_and_the_app_reads_the_transaction_from_the_mfa(env, fcm):
    harness, stub, orch = env
    app = PushApp("inst-fcm")
    ref = customer(stub, harness.settings, "cust-fcm", app)
    saved, orch.push_gateway = orch.push_gateway, FcmPushGateway("bank-app", "ya29.test", fcm.url)
    fcm.requests.clear()
    try:
        s = web_payment(stub, app, ref)
        sent = send(stub, s)
    finally:
        orch.push_gateway = saved
    [req] = fcm.requests
    assert sent.sent and req["problems"] == []
    msg = req["body"]["message"]
    assert msg["token"] == app.push_token and msg["android"]["ttl"] == "60s"
    assert msg["data"] == {"type": "biogate.confirm", "cid": sent.confirmation_id, "sid": s.session_id,
                           "request_id": msg["data"]["request_id"]}  # the call's generated id
    assert msg["apns"]["payload"]["aps"]["alert"] == {"loc-key": "biogate_confirm_transaction"}  # the wake-up alert
    ids = {sent.confirmation_id, s.session_id, msg["data"]["request_id"], app.push_token,
           msg["apns"]["headers"]["apns-expiration"]}  # random ids, the token, a time: digits by chance
    rest = " ".join(x for x in leaves(req["body"]) if x not in ids)  # everything else FCM (and APNs) receive
    for shown in ("Li Lei", "6222", "1234", str(AMOUNT), "1200", "CNY", "payment", "FR", "web", s.nonce,
                  ref.subject_id, ref.tenant_id):
        assert shown not in rest, shown

    got = stub.GetPushConfirmation(app.fetch_request(msg["data"]))
    fields = json.loads(got.fields)
    assert fields["cid"] == sent.confirmation_id and fields["action"] == "payment"
    assert fields["amount"] == {"cur": "CNY", "minor": AMOUNT}
    assert fields["payee"] == {"name": "Li Lei", "account": "6222 **** **** 1234"}
    assert fields["shown"] == {"channel": "web", "country": "FR", "device": "new"}
    assert got.expires_at == sent.expires_at
    assert confirm(stub, s, app.answer(fields, sent.number)).result.passed


def leaves(doc) -> list[str]:
    """Every key and scalar of a JSON document, as strings."""
    if isinstance(doc, dict):
        return [x for k, v in doc.items() for x in (str(k), *leaves(v))]
    if isinstance(doc, list):
        return [x for v in doc for x in leaves(v)]
    return [str(doc)]


def test_only_the_device_the_push_went_to_reads_it_and_only_while_it_is_out(env, two_phones, clock):
    harness, stub, orch = env
    app, other, ref = two_phones
    stranger = PushApp("inst-fetch-stranger")  # another subject's bound phone
    customer(stub, harness.settings, "cust-fetch-stranger", stranger)
    s = web_payment(stub, app, ref)
    sent = send(stub, s)
    target = next(a for a in (app, other) if a.device_id == sent.device_id)
    bystander = other if target is app else app
    data = {"cid": sent.confirmation_id, "sid": s.session_id}

    def refused(req) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPushConfirmation(req)
        return err.value.code(), reason(err.value)

    denied = grpc.StatusCode.PERMISSION_DENIED
    assert refused(bystander.fetch_request(data)) == (denied, "PUSH_WRONG_DEVICE")  # the subject's other phone
    assert refused(stranger.fetch_request(data)) == (denied, "PUSH_WRONG_DEVICE")  # another subject's phone
    assert refused(stranger.fetch_request(data, device_id=target.device_id)) == (denied, "PUSH_SIGNATURE_INVALID")
    assert refused(bystander.fetch_request(data, device_id=target.device_id)) == (denied, "PUSH_SIGNATURE_INVALID")
    forged = target.fetch_request(data)
    forged.confirmation_id = "pc_" + "0" * 32  # not the one out
    assert refused(forged) == (grpc.StatusCode.FAILED_PRECONDITION, "PUSH_NOT_CURRENT")
    audit = [json.loads(r.details) for r in orch.rt.storage.audit.iter_records() if r.event_type == "mfa.push_fetched"]
    mine = [a["refused"] for a in audit if a["session_id"] == s.session_id]
    assert mine == ["PUSH_WRONG_DEVICE", "PUSH_WRONG_DEVICE", "PUSH_SIGNATURE_INVALID", "PUSH_SIGNATURE_INVALID"]

    clock.advance(60)  # the policy's ttl_s
    assert refused(target.fetch_request(data)) == (grpc.StatusCode.FAILED_PRECONDITION, "PUSH_EXPIRED")
    clock.advance(-1)
    fields = json.loads(stub.GetPushConfirmation(target.fetch_request(data)).fields)
    assert confirm(stub, s, target.answer(fields, sent.number)).result.passed
    assert refused(target.fetch_request(data)) == (grpc.StatusCode.FAILED_PRECONDITION, "PUSH_ALREADY_ANSWERED")
    stored = orch.sessions.get(s.session_id).state.push
    assert stored["answered"] and "sealed" not in stored  # what it showed is not kept past its answer
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
    assert refused(target.fetch_request(data)) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_DECIDED")

    s = web_payment(stub, app, ref)  # a replaced confirmation is no longer read
    first = send(stub, s)
    second = send(stub, s)
    reader = next(a for a in (app, other) if a.device_id == first.device_id)
    assert refused(reader.fetch_request({"cid": first.confirmation_id, "sid": s.session_id})) == (
        grpc.StatusCode.FAILED_PRECONDITION, "PUSH_NOT_CURRENT")
    assert second.sent


def test_a_deny_ends_the_session_deny_and_flags_the_subject(env):
    harness, stub, orch = env
    app = PushApp("inst-deny")
    ref = customer(stub, harness.settings, "cust-deny", app)
    s = web_payment(stub, app, ref)
    sent = send(stub, s)
    r = confirm(stub, s, app.answer(shown_fields(stub, harness.settings, app, sent.confirmation_id), "", answer="deny"))
    assert not r.result.passed and [x.code for x in r.result.reasons] == ["PUSH_DENIED"]
    assert r.decision.outcome == F.OUTCOME_DENY and r.decision.reasons[0].code == "CUSTOMER_DENIED"
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_DENY
    with pytest.raises(grpc.RpcError) as err:
        otp(stub, harness.settings, s.session_id)
    assert reason(err.value) == "SESSION_DECIDED"
    flag = orch.store.subject_signals.get(ref.tenant_id, ref.subject_id)
    assert flag is not None and flag.flagged_at is not None and flag.flag_reason == "PUSH_DENIED"
    assert any(r.event_type == "mfa.fraud_flagged" for r in orch.rt.storage.audit.iter_records())
    # the fraud signal holds the next payment to more (cooling_off)
    again = web_payment(stub, app, ref)
    assert "RECENT_FRAUD_SIGNAL" in [x.code for x in again.risk.reasons]


@pytest.fixture(scope="module")
def two_phones(env):
    harness, stub, _ = env
    app, other = PushApp("inst-refuse-1"), PushApp("inst-refuse-2")
    ref = customer(stub, harness.settings, "cust-refuse", app, other)
    return app, other, ref


def sent_to(stub, harness, apps, s):
    """The confirmation out, the app it went to (the most recently seen bound device) and its fields."""
    sent = send(stub, s)
    app = next(a for a in apps if a.device_id == sent.device_id)
    return sent, app, shown_fields(stub, harness.settings, app, sent.confirmation_id)


@pytest.mark.parametrize("case, code", [
    ("number", "PUSH_NUMBER_MISMATCH"),
    ("amount", "PUSH_CONTEXT_MISMATCH"),
    ("payee", "PUSH_CONTEXT_MISMATCH"),
    ("wrong_device", "PUSH_WRONG_DEVICE"),
    ("other_session", "PUSH_FOR_OTHER_SESSION"),
    ("forged", "PUSH_SIGNATURE_INVALID"),
])
def test_a_wrong_answer_is_refused_with_its_reason_and_never_allows(env, two_phones, case, code):
    harness, stub, _ = env
    app, other, ref = two_phones
    s = web_payment(stub, app, ref)
    sent, target, fields = sent_to(stub, harness, (app, other), s)
    bystander = other if target is app else app
    number = sent.number
    if case == "number":
        answer = target.answer(fields, f"{(int(number) + 1) % 100:02d}")
    elif case == "amount":  # the app was shown (and signed) another amount than the session's
        answer = target.answer(fields, number, amount={"cur": "CNY", "minor": 9_900_000})
    elif case == "payee":
        answer = target.answer(fields, number, payee={"name": "Mule Co", "account": "6222 **** **** 9999"})
    elif case == "wrong_device":  # the subject's other bound phone answers a push it was not sent
        answer = bystander.answer(fields, number)
    elif case == "other_session":  # a genuine approval of another session's confirmation, replayed here
        s2 = web_payment(stub, app, ref)
        sent2, target2, fields2 = sent_to(stub, harness, (app, other), s2)
        answer = target2.answer(fields2, sent2.number)
        answer.confirmation_id = sent.confirmation_id
        answer.context = target2.answer({**fields2, "cid": sent.confirmation_id}, sent2.number).context
        answer.signature = target2.sign(answer.context)
    else:
        answer = bystander.answer(fields, number, device_id=target.device_id)  # the other key, this device's id
    r = confirm(stub, s, answer)
    assert not r.result.passed and r.result.reasons[0].code == code
    assert r.result.veto == (code == "PUSH_CONTEXT_MISMATCH")
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome != F.OUTCOME_ALLOW
    with pytest.raises(grpc.RpcError) as err:  # answered once: a new confirmation is needed
        confirm(stub, s, target.answer(fields, number))
    assert reason(err.value) in ("PUSH_ALREADY_ANSWERED", "SESSION_DECIDED")


def test_a_replayed_or_expired_answer_is_refused_before_anything_is_written(env, two_phones, clock):
    harness, stub, _ = env
    app, other, ref = two_phones
    s = web_payment(stub, app, ref)
    sent, target, fields = sent_to(stub, harness, (app, other), s)
    answer = target.answer(fields, sent.number)
    assert confirm(stub, s, answer).result.passed
    with pytest.raises(grpc.RpcError) as err:
        confirm(stub, s, answer)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(err.value) == "PUSH_ALREADY_ANSWERED"

    s = web_payment(stub, app, ref)
    sent, target, fields = sent_to(stub, harness, (app, other), s)
    clock.advance(60)  # the policy's ttl_s
    with pytest.raises(grpc.RpcError) as err:
        confirm(stub, s, target.answer(fields, sent.number))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(err.value) == "PUSH_EXPIRED"
    clock.advance(-1)  # a fresh answer within the lifetime still counts: nothing was consumed
    assert confirm(stub, s, target.answer(fields, sent.number)).result.passed


def test_a_push_gateway_outage_falls_back_to_the_policy_factors_never_to_an_allow(env, fcm):
    harness, stub, orch = env
    app = PushApp("inst-outage")
    ref = customer(stub, harness.settings, "cust-outage", app)
    saved = orch.push_gateway
    fcm.requests.clear()
    fcm.fail_with = 503
    orch.push_gateway = FcmPushGateway("bank-app", "ya29.test", fcm.url, timeout_s=2, retries=1, backoff_s=0)
    try:
        s = web_payment(stub, app, ref)
        sent = send(stub, s)
    finally:
        orch.push_gateway, fcm.fail_with = saved, 0
    assert len(fcm.requests) == 2  # one retry of a 503
    assert not sent.sent and sent.reason.code == "PUSH_UNAVAILABLE" and not sent.number
    acceptable = [list(x.factors) for x in sent.acceptable]  # the fallback, and the sets without push
    assert [F.FACTOR_TYPE_SMS_OTP] in acceptable and not any(F.FACTOR_TYPE_PUSH in x for x in acceptable)
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_STEP_UP and [F.FACTOR_TYPE_SMS_OTP] in [list(x.factors) for x in d.still_needed]
    with pytest.raises(grpc.RpcError) as err:  # the push no longer counts in this session
        send(stub, s)
    assert reason(err.value) == "FACTOR_NOT_ACCEPTABLE"
    assert otp(stub, harness.settings, s.session_id, payee=PAYEE).result.passed
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW


def test_without_a_push_capable_device_the_session_falls_back(env):
    harness, stub, _ = env
    app = PushApp("inst-no-token")
    ref = customer(stub, harness.settings, "cust-no-token", app)
    stub.SetPushToken(F.SetPushTokenRequest(subject=ref, device_id=app.device_id, push_token=""))
    s = web_payment(stub, app, ref)
    sent = send(stub, s)
    assert not sent.sent and sent.reason.code == "NO_PUSH_DEVICE"
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_STEP_UP


def test_bad_requests_are_refused_with_a_clear_status(env, two_phones):
    harness, stub, _ = env
    app, other, ref = two_phones
    s = web_payment(stub, app, ref)
    with pytest.raises(grpc.RpcError) as err:
        confirm(stub, s, app.answer({"cid": "pc_x"}, "00"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # nothing sent yet
        fields = {"v": 1, "type": "push", "cid": "pc_1", "sid": s.session_id, "nonce": s.nonce, "tenant": ref.tenant_id,
                  "action": "payment", "amount": None, "payee": None,
                  "shown": {"channel": "web", "country": None, "device": "new"}, "exp": "2026-01-01T00:00:00+00:00"}
        confirm(stub, s, app.answer(fields, "00"))
    assert reason(err.value) == "PUSH_NOT_SENT"
    with pytest.raises(grpc.RpcError) as err:
        stub.SendPushConfirmation(F.SendPushConfirmationRequest(
            session_id=s.session_id, payee=F.Payee(name="Mule Co", account_masked="6222 **** **** 9999")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.SetPushToken(F.SetPushTokenRequest(subject=ref, device_id="dev_nope", push_token="t"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_session_sends_at_most_max_sends_confirmations(env, two_phones):
    harness, stub, _ = env
    app, other, ref = two_phones
    s = web_payment(stub, app, ref)
    for _ in range(5):  # the policy's max_sends; each new one replaces the last
        assert send(stub, s).sent
    with pytest.raises(grpc.RpcError) as err:
        send(stub, s)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(err.value) == "PUSH_LIMIT"


def test_a_passkey_device_answers_with_a_webauthn_assertion_over_the_confirmation(env):
    from tests.mfa.authenticator import SoftAuthenticator

    harness, stub, _ = env
    app, passkey = PushApp("inst-passkey"), SoftAuthenticator()
    ref = customer(stub, harness.settings, "cust-passkey")
    s = start(stub, app, ref)
    otp(stub, harness.settings, s.session_id)
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
    options = stub.StartDeviceRegistration(F.StartDeviceRegistrationRequest(session_id=s.session_id)).options_json
    app.device_id = stub.RegisterDevice(F.RegisterDeviceRequest(
        session_id=s.session_id, device=app.device, webauthn_registration_json=passkey.create(options),
        label="passkey")).device_id
    stub.SetPushToken(F.SetPushTokenRequest(subject=ref, device_id=app.device_id, push_token=app.push_token))

    s = web_payment(stub, app, ref)
    sent = send(stub, s)
    answer = app.answer(shown_fields(stub, harness.settings, app, sent.confirmation_id, passkey=passkey), sent.number)
    answer.ClearField("signature")
    forged = F.PushAnswer()
    forged.CopyFrom(answer)
    forged.webauthn.CopyFrom(passkey.assert_context(answer.context + b" "))  # over other bytes
    r = confirm(stub, s, forged)
    assert not r.result.passed and r.result.reasons[0].code == "PUSH_SIGNATURE_INVALID"

    s = web_payment(stub, app, ref)
    sent = send(stub, s)
    answer = app.answer(shown_fields(stub, harness.settings, app, sent.confirmation_id, passkey=passkey), sent.number)
    answer.ClearField("signature")
    answer.webauthn.CopyFrom(passkey.assert_context(answer.context))
    r = confirm(stub, s, answer)
    assert r.result.passed and r.result.binding == "webauthn"
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW


def test_a_deny_flags_the_bound_device_the_transaction_started_on(env, clock):
    harness, stub, orch = env
    phone, tablet = PushApp("inst-flag-phone"), PushApp("inst-flag-tablet")
    ref = customer(stub, harness.settings, "cust-flag", phone, tablet)
    stub.SetPushToken(F.SetPushTokenRequest(subject=ref, device_id=tablet.device_id, push_token=""))
    clock.advance(86400 + 1)  # past the tablet's cooling-off
    s = start(stub, tablet, ref, action="payment", amount=AMOUNT)  # on the tablet, e.g. stolen
    sent = send(stub, s)
    assert sent.device_id == phone.device_id
    r = confirm(stub, s, phone.answer(shown_fields(stub, harness.settings, phone, sent.confirmation_id), "", answer="deny"))
    assert r.decision.outcome == F.OUTCOME_DENY
    assert orch.store.devices.get(ref.tenant_id, tablet.device_id).flagged_at is not None
    assert orch.store.devices.get(ref.tenant_id, phone.device_id).flagged_at is None
    again = start(stub, tablet, ref, action="payment", amount=AMOUNT)
    assert {"FLAGGED_DEVICE", "RECENT_FRAUD_SIGNAL"} <= {x.code for x in again.risk.reasons}
