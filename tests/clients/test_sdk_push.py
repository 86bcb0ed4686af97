"""The SDK's push confirmation against a real MFA on loopback (the push tenant of
tests/mfa/pushapp.py): the customer's app, bound with the SDK, receives the development push (ids
only), reads what it confirms from the MFA with a request signed by its bound key, shows it and
answers with the number on the bank's screen; a wrong number never allows, and another phone
cannot read it."""

from __future__ import annotations

import pytest

from biogate_client import BioGate, Device, PermissionDenied, dev_credentials, dev_otp, dev_push, device_info
from biogate_client import FailedPrecondition, push_fetch_context
from services.common.api.v1.mfa_pb2 import OUTCOME_ALLOW, OUTCOME_DENY
from services.mfa.binding import canonical_json
from services.mfa.push.confirmation import fetch_context
from tests.mfa.pushapp import TENANT, push_server

PAYEE = ("Li Lei", "6222 **** **** 1234")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with push_server(tmp_path_factory.mktemp("sdk-push"), "sqlite") as (harness, _, _orch):
        client = BioGate(mfa=harness.running["mfa"].address, face="127.0.0.1:9", voice="127.0.0.1:9",
                         credentials=dev_credentials(harness.settings.dev_credentials_file), timeout=30)
        yield client, harness.settings.data_dir
        client.close()


def customer_with_app(bg: BioGate, data_dir, subject: str) -> Device:
    """Consent, phone number, and the app bound after an SMS-code login, with its push token."""
    bg.record_consent(TENANT, subject)
    bg.set_phone(TENANT, subject, "+8613800138000")
    phone = Device()
    s = bg.start(TENANT, subject, phone)
    s.send_otp()
    s.submit_otp(dev_otp(data_dir / "sms-outbox.jsonl"))
    assert s.decide().outcome == OUTCOME_ALLOW
    phone.device_id = s.register_device()
    bg.set_push_token(TENANT, subject, phone.device_id, "fcm-token-sdk")
    return phone


def web_payment(bg: BioGate, subject: str):
    browser = Device(device_info("browser-sdk", platform="web", locale="fr_FR"))
    return bg.start(TENANT, subject, browser, action="payment", channel="web", amount=("CNY", 120000), payee=PAYEE)


def test_the_app_confirms_a_web_payment_with_the_number_on_the_screen(env):
    bg, data_dir = env
    phone = customer_with_app(bg, data_dir, "cust-sdk-push")
    s = web_payment(bg, "cust-sdk-push")
    sent = s.send_push()
    assert sent.sent and sent.device_id == phone.device_id and len(sent.number) >= 2
    push = dev_push(data_dir / "push-outbox.jsonl", sent.confirmation_id)
    assert push == {"type": "biogate.confirm", "cid": sent.confirmation_id, "sid": s.id,
                    "request_id": push["request_id"]}  # what FCM would carry: ids only
    assert push_fetch_context(s.id, sent.confirmation_id, phone.device_id) == fetch_context(
        s.id, sent.confirmation_id, phone.device_id)  # the SDK signs the server's bytes
    fetched = bg.get_push_confirmation(phone.push_fetch(push))
    shown = phone.confirmation(fetched)
    assert shown["amount"] == {"cur": "CNY", "minor": 120000} and shown["payee"] == {"name": PAYEE[0], "account": PAYEE[1]}
    assert shown["action"] == "payment" and "number" not in shown  # only the bank's screen shows the number
    assert fetched.expires_at == sent.expires_at

    other = Device(device_id=phone.device_id)  # another key claiming the phone's device id
    with pytest.raises(PermissionDenied) as err:
        bg.get_push_confirmation(other.push_fetch(push))
    assert err.value.reason == "PUSH_SIGNATURE_INVALID"

    wrong = f"{(int(sent.number) + 1) % 100:02d}"
    refused = bg.confirm_transaction(s.id, phone.answer_push(fetched, "approve", wrong))
    assert not refused.result.passed and [r.code for r in refused.result.reasons] == ["PUSH_NUMBER_MISMATCH"]
    assert s.decide().outcome != OUTCOME_ALLOW

    sent = s.send_push()  # a refused answer used the confirmation up: a new one, with a new number
    with pytest.raises(FailedPrecondition) as used_up:  # the used-up one is no longer read
        bg.get_push_confirmation(phone.push_fetch(push))
    assert used_up.value.reason == "PUSH_NOT_CURRENT"
    push = dev_push(data_dir / "push-outbox.jsonl", sent.confirmation_id)
    shown = phone.confirmation(bg.get_push_confirmation(phone.push_fetch(push)))
    answer = phone.answer_push(shown, "approve", sent.number)
    assert answer.context == canonical_json({**shown, "answer": "approve", "number": sent.number})  # the server's bytes
    assert bg.confirm_transaction(s.id, answer).result.passed
    d = s.decide()
    assert d.outcome == OUTCOME_ALLOW and list(d.amr) == ["swk"], d  # the push alone (RFC 8176: software key)
    assert bg.verify_token(d.token, TENANT, session_id=s.id)["decision"] == "allow"


def test_a_deny_from_the_app_ends_the_session(env):
    bg, data_dir = env
    phone = customer_with_app(bg, data_dir, "cust-sdk-deny")
    s = web_payment(bg, "cust-sdk-deny")
    sent = s.send_push()
    fetched = bg.get_push_confirmation(phone.push_fetch(dev_push(data_dir / "push-outbox.jsonl", sent.confirmation_id)))
    r = bg.confirm_transaction(s.id, phone.answer_push(fetched, "deny", sent.number))
    assert r.decision.outcome == OUTCOME_DENY and not r.decision.token  # no bearer credential
    with pytest.raises(ValueError):
        phone.answer_push(fetched, "maybe", sent.number)
