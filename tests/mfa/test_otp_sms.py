"""SMS OTP (NIST SP 800-63B-4 restricted authenticator) and the SMS gateways: the development
sink, and the HTTP adapter against a local fake gateway with timeouts and 5xx answers."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.errors import ServiceError, details_of
from services.mfa import subjects
from services.mfa.otp import new_code
from services.mfa.sms import HttpSmsGateway, SmsError
from services.common.context import SYSTEM
from tests.conftest import present
from tests.mfa.conftest import OTP_POLICY, App, outbox_codes

F = mfa_pb2
PHONE = "+8613800135678"


def enrol(orch, tenant="otp-bank", sid="cust-0001", phone=PHONE):
    ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=sid)
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164=phone), caller=SYSTEM)
    return ref


def session(orch, ref):
    return orch.start(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login",
                                                   device=App().device), caller=SYSTEM)


def submit(orch, sid, code):
    return orch.submit(F.SubmitFactorRequest(session_id=sid, otp=F.OtpEvidence(code=code)), caller=SYSTEM)


def test_codes_are_six_random_digits():
    codes = {new_code(6) for _ in range(2000)}
    assert all(len(c) == 6 and c.isdigit() for c in codes)
    assert len(codes) > 1900  # from secrets, not a clock or a counter
    assert len(new_code(8)) == 8


def test_the_code_is_stored_keyed_hashed_and_works_once(orch):
    ref = enrol(orch)
    s = session(orch, ref)
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    code = outbox_codes(orch.rt.settings)[-1]
    with orch.rt.storage.db.read() as q:
        rows = q.all("SELECT code_hash FROM otp_challenges")
    assert len(rows) == 1 and code not in rows[0][0] and len(rows[0][0]) == 64
    import hashlib
    assert rows[0][0] != hashlib.sha256(code.encode()).hexdigest()  # keyed, not a bare hash
    assert submit(orch, s.session_id, code).result.passed
    again = submit(orch, s.session_id, code)  # single use
    assert not again.result.passed and again.result.reasons[0].code == "OTP_EXPIRED_OR_USED"


def test_the_code_expires(orch, clock):
    ref = enrol(orch)
    s = session(orch, ref)
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    code = outbox_codes(orch.rt.settings)[-1]
    clock.advance(orch.policies.get("otp-bank").factors.sms_otp.ttl_s + 1)
    r = submit(orch, s.session_id, code)
    assert not r.result.passed and r.result.reasons[0].code == "OTP_EXPIRED_OR_USED"


def test_a_new_code_replaces_the_previous_one(orch):
    ref = enrol(orch)
    s = session(orch, ref)
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    first = outbox_codes(orch.rt.settings)[-1]
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    second = outbox_codes(orch.rt.settings)[-1]
    if first != second:
        assert not submit(orch, s.session_id, first).result.passed
    assert submit(orch, s.session_id, second).result.passed


def test_resend_cool_down_and_rate_limits(tmp_path, clock):
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from tests.mfa.conftest import settings_for

    settings = settings_for(tmp_path)
    rt = Runtime.open(settings)
    orch = Orchestrator(rt, clock=clock)
    try:
        ref = enrol(orch, "bank-a", "cust-1")
        s = session(orch, ref)
        clock.room_in_window(3600, 6 * 31 + 60)  # the per-phone limit counts in hour-aligned windows
        sent = orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
        assert sent.resend_after.seconds - sent.expires_at.seconds == 30 - 300
        with pytest.raises(ServiceError) as err:
            orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "OTP_COOLDOWN"
        assert int(err.value.metadata["retry_after_s"]) <= 30
        for _ in range(4):
            clock.advance(31)
            orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
        clock.advance(31)
        with pytest.raises(ServiceError) as err:  # 5 per phone per hour
            orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "OTP_RATE_LIMITED"
        # another subject with the same phone number shares the phone's budget
        other = enrol(orch, "bank-a", "cust-2")
        s2 = session(orch, other)
        with pytest.raises(ServiceError) as err:
            orch.send_otp(F.SendOtpRequest(session_id=s2.session_id), caller=SYSTEM)
        assert err.value.reason == "OTP_RATE_LIMITED" and "phone" in err.value.message
    finally:
        orch.close()
        rt.close()


def test_no_phone_is_a_failed_precondition_and_the_sink_masks_the_number(orch, caplog):
    ref = common_pb2.SubjectRef(tenant_id="otp-bank", subject_id="cust-nophone")
    s = session(orch, ref)
    with pytest.raises(ServiceError) as err:
        orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    assert err.value.reason == "NO_PHONE"
    ref = enrol(orch)
    s = session(orch, ref)
    caplog.set_level("DEBUG")
    assert orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM).masked_phone == "+86 *** **** 5678"
    outbox = (orch.rt.settings.data_dir / "sms-outbox.jsonl").read_text()
    assert PHONE not in outbox and "+86 *** **** 5678" in outbox
    code = outbox_codes(orch.rt.settings)[-1]
    assert PHONE not in caplog.text and code not in caplog.text
    with orch.rt.storage.db.read() as q:
        audit = json.dumps([list(map(str, r)) for r in q.all("SELECT * FROM audit_records")])
    assert PHONE not in audit and "13800135678" not in audit and code not in audit and "cust-0001" not in audit


def test_a_payments_code_names_its_amount_and_the_payee_shown(orch):
    """PSD2 RTS art. 5: the payer is made aware of the amount and the payee the code authorises. The
    text said "your verification code" whatever it authorised, so a code phished for a login (or
    another payee) read the same as this payment's."""
    def texts():
        path = orch.rt.settings.data_dir / "sms-outbox.jsonl"
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]

    ref = enrol(orch)
    payee = F.Payee(name="Li Lei", account_masked="6222 **** **** 1234")
    pay = orch.start(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="payment",
                                                  device=App().device, payee=payee,
                                                  amount=F.Money(currency="CNY", amount_minor=490000)), caller=SYSTEM)
    other = F.Payee(name="Han Meimei", account_masked="6222 **** **** 9999")
    with pytest.raises(ServiceError) as err:  # not the payee the session started with: nothing is sent
        orch.send_otp(F.SendOtpRequest(session_id=pay.session_id, payee=other), caller=SYSTEM)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "payee is not the one" in err.value.message
    assert not (orch.rt.settings.data_dir / "sms-outbox.jsonl").exists()
    orch.send_otp(F.SendOtpRequest(session_id=pay.session_id, payee=payee), caller=SYSTEM)
    code = outbox_codes(orch.rt.settings)[-1]
    assert texts()[-1].startswith(f"{code} is your code for payment of CNY 4,900.00 to Li Lei (6222 **** **** 1234). ")
    assert submit(orch, pay.session_id, code).result.passed
    # a bank banding yen payments (otp-bank's bands cover CNY only, so it takes none)
    (orch.settings.mfa.policy_dir / "yen-bank.yaml").write_text(OTP_POLICY.replace("CNY:", "JPY:"))
    orch.send_otp(F.SendOtpRequest(session_id=orch.start(F.StartAuthenticationRequest(
        subject=enrol(orch, "yen-bank"), channel=F.CHANNEL_APP, action="payment", device=App().device, payee=payee,
        amount=F.Money(currency="JPY", amount_minor=4900)), caller=SYSTEM).session_id, payee=payee), caller=SYSTEM)
    assert " is your code for payment of JPY 4,900 to Li Lei (6222 **** **** 1234). " in texts()[-1]
    orch.send_otp(F.SendOtpRequest(session_id=session(orch, ref).session_id), caller=SYSTEM)
    assert " is your verification code. " in texts()[-1]


def test_a_payments_code_is_not_sent_without_the_payee(orch):
    """PSD2 RTS art. 5 (dynamic linking): a code for a payment names the amount and the payee. SendOtp
    without the payee sent "your code for payment of CNY 4,900.00" alone, the payee left out; now it
    is refused, naming the field and what to send, before any SMS, code, cool-down or audit record."""
    ref = enrol(orch)
    payee = F.Payee(name="Li Lei", account_masked="6222 **** **** 1234")
    pay = orch.start(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="payment",
                                                  device=App().device, payee=payee,
                                                  amount=F.Money(currency="CNY", amount_minor=490000)), caller=SYSTEM)

    def written():
        with orch.rt.storage.db.read() as q:
            return (q.all("SELECT COUNT(*) FROM otp_challenges")[0][0], q.all("SELECT COUNT(*) FROM audit_records")[0][0],
                    orch.sessions.get(pay.session_id).version)
    before = written()
    with pytest.raises(ServiceError) as err:
        orch.send_otp(F.SendOtpRequest(session_id=pay.session_id), caller=SYSTEM)
    e = err.value
    assert (e.code, e.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PAYEE_REQUIRED")
    assert [f for f, _ in e.field_violations] == ["payee"]
    assert "payee" in e.message and "StartAuthentication" in e.message  # what to send: the payee it started with
    assert not (orch.rt.settings.data_dir / "sms-outbox.jsonl").exists() and written() == before
    orch.send_otp(F.SendOtpRequest(session_id=pay.session_id, payee=payee), caller=SYSTEM)  # named: sent
    assert len(outbox_codes(orch.rt.settings)) == 1
    # a login names no payee, and may not invent one
    orch.send_otp(F.SendOtpRequest(session_id=session(orch, ref).session_id), caller=SYSTEM)
    with pytest.raises(ServiceError) as err:
        orch.send_otp(F.SendOtpRequest(session_id=session(orch, ref).session_id, payee=payee), caller=SYSTEM)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "payee is not the one" in err.value.message


# --- the HTTP gateway against a local fake SMS API ---------------------------------------------

class FakeGateway:
    """A local HTTP SMS API whose next answers are scripted: a status code, or "sleep"."""

    def __init__(self) -> None:
        self.script: list = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"body": body, "key": self.headers.get("Idempotency-Key"),
                                       "auth": self.headers.get("Authorization")})
                step = outer.script.pop(0) if outer.script else 200
                if step == "sleep":
                    time.sleep(1.0)
                    step = 200
                try:
                    self.send_response(step)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"id": f"msg-{len(outer.requests)}"}).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sms"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = FakeGateway()
    yield f
    f.close()


def gateway(fake, retries=2):
    return HttpSmsGateway(fake.url, token="sms-secret", timeout_s=0.3, retries=retries, backoff_s=0.01)


def test_http_gateway_sends_json_with_token_and_idempotency_key(fake):
    assert gateway(fake).send(PHONE, "123456 is your code", "otp-1") == "msg-1"
    req = fake.requests[0]
    assert req["body"] == {"to": PHONE, "text": "123456 is your code", "sender": "BioGate"}
    assert req["key"] == "otp-1" and req["auth"] == "Bearer sms-secret"


def test_http_gateway_retries_5xx_and_timeouts_with_the_same_key(fake):
    fake.script = [503, "sleep"]
    assert gateway(fake).send(PHONE, "x", "otp-2") == "msg-3"
    assert [r["key"] for r in fake.requests] == ["otp-2"] * 3


def test_http_gateway_gives_up_after_bounded_retries(fake):
    fake.script = [500, 502, 503, 504]
    with pytest.raises(SmsError) as err:
        gateway(fake, retries=2).send(PHONE, "x", "otp-3")
    assert err.value.transient and len(fake.requests) == 3 and "HTTP 503" in str(err.value)


def test_http_gateway_does_not_retry_a_refusal(fake):
    fake.script = [400]
    with pytest.raises(SmsError) as err:
        gateway(fake).send(PHONE, "x", "otp-4")
    assert not err.value.transient and len(fake.requests) == 1


def test_http_gateway_unreachable_is_an_error_not_a_hang():
    with pytest.raises(SmsError) as err:  # a hang would be cut by the test timeout, not pass
        HttpSmsGateway("http://127.0.0.1:9/sms", timeout_s=0.3, retries=1, backoff_s=0.01).send(PHONE, "x", "k")
    assert err.value.transient  # worth a retry later: nothing answered


def test_a_failed_send_is_unavailable_and_its_code_is_void(tmp_path, clock, fake):
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from tests.mfa.conftest import settings_for

    settings = settings_for(tmp_path)
    rt = Runtime.open(settings)
    orch = Orchestrator(rt, gateway=gateway(fake, retries=1), clock=clock)
    try:
        ref = enrol(orch)
        s = session(orch, ref)
        fake.script = [500, 500]
        with pytest.raises(ServiceError) as err:
            orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "SMS_GATEWAY_FAILED"
        code = present(re.match(r"\d+", fake.requests[-1]["body"]["text"])).group()
        with pytest.raises(ServiceError) as err:  # never delivered: never usable
            submit(orch, s.session_id, code)
        assert err.value.reason == "OTP_NOT_SENT"
        assert orch.store.otp.get_active_for_session(s.session_id, clock()) is None
        sent = orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)  # no cool-down was spent
        assert sent.masked_phone
        code = present(re.match(r"\d+", fake.requests[-1]["body"]["text"])).group()
        assert submit(orch, s.session_id, code).result.passed
    finally:
        orch.close()
        rt.close()


def test_one_bank_cannot_spend_another_banks_otp_budget_for_a_phone_number(tmp_path, clock):
    """A caller of bank A registers bank B's customer's phone number on a subject of its own and
    sends codes to it until the per-phone window is full: bank B's customer must still get a code
    (and an erasure at bank A must not reset bank B's count)."""
    from services.common.client import connect
    from services.common.api.v1 import mfa_pb2_grpc
    from services.common.server.auth import token_sha256
    from services.common.server.bootstrap import RunningServer
    from services.mfa.server import definition
    from services.serve import prepare
    from tests.conftest import make_settings
    from tests.mfa.conftest import DEAD, OTP_POLICY, setup_subject

    (tmp_path / "pol").mkdir()
    for tenant in ("bank-a", "bank-b"):
        (tmp_path / "pol" / f"{tenant}.yaml").write_text(OTP_POLICY)
    principals = [{"name": f"{t}-app", "roles": ["orchestrator", "enroller"], "tenants": [t],
                   "token_sha256": token_sha256(f"tok-{t}")} for t in ("bank-a", "bank-b")]
    settings = make_settings(tmp_path / "data", auth={"principals": principals, "dev_credentials": False},
                             mfa={"policy_dir": str(tmp_path / "pol"), "policy_check_s": 0},
                             clients={"face": {"target": DEAD, "retries": 0}, "voice": {"target": DEAD, "retries": 0}})
    prepare(settings)
    clock.room_in_window(3600, 60)  # the per-phone limit (5) counts in hour-aligned windows; the clock stands still
    running = RunningServer(settings, definition(settings, clock=clock), port=0).start()
    try:
        assert running.ready.wait(30)
        with connect(running.address, "tok-bank-a") as ach, connect(running.address, "tok-bank-b") as bch:
            a, b = mfa_pb2_grpc.MfaServiceStub(ach), mfa_pb2_grpc.MfaServiceStub(bch)

            def send(stub, ref):
                s = stub.StartAuthentication(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP,
                                                                          action="login", device=App().device))
                return stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))

            victim = setup_subject(b, common_pb2.SubjectRef(tenant_id="bank-b", subject_id="cust-victim"), PHONE)
            decoy = setup_subject(a, common_pb2.SubjectRef(tenant_id="bank-a", subject_id="decoy-1"), PHONE)
            for _ in range(5):
                send(a, decoy)
            with pytest.raises(grpc.RpcError) as err:  # bank A's own budget for the number is spent
                send(a, decoy)
            assert details_of(err.value)["reason"] == "OTP_RATE_LIMITED"
            assert send(b, victim).masked_phone  # bank B's is not
    finally:
        running.stop(0)
