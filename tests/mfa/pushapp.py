"""A real MFA server on loopback for the push confirmation and account-change tests, a tenant
policy with push, fallback and cooling-off, and the customer's app answering confirmations (what
tests/mfa/test_push*.py and test_account_changes.py drive)."""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from services.common.api.v1 import mfa_pb2, mfa_pb2_grpc
from services.mfa.binding import canonical_json
from tests.conftest import ServiceHarness, _fresh_schema, make_settings
from tests.mfa.conftest import DEAD, App, outbox_codes, setup_subject, subject

F = mfa_pb2
TENANT = "push-bank"
PAYEE = F.Payee(name="Li Lei", account_masked="6222 **** **** 1234")

# Payments: a push approval alone, or the bound device with the SMS code, or a face with either;
# the app unreachable: the SMS code (ivr_callback off: no voice here). Payments after a phone
# change or a second device's binding need two independent authenticators and more evidence.
PUSH_POLICY = """\
version: push-test-1
factors:
  sms_otp:
    {evidence: 3.0, resend_cooldown_s: 0, max_attempts: 10, per_phone: {limit: 500, window_s: 3600},
     per_subject: {limit: 500, window_s: 3600}}
  device:
    evidence: 3.0
    binding: {min_acr: aal1, within_s: 300}
  push: {evidence: 4.0, ttl_s: 60, max_sends: 5, fallback: [[sms_otp]], ivr_callback: false}
actions:
  login:
    required: 3.0
    acceptable: [[sms_otp], [device]]
  payment:
    required: 3.0
    payee: required
    acceptable: [[push], [device, sms_otp], [face, device], [face, sms_otp]]
  change_phone:
    required: 6.0
    acceptable: [[device, sms_otp], [push, sms_otp], [face, device]]
cooling_off:
  window_s: 86400
  actions: [payment]
  requirement: {min_factors: 2, min_independent: 2, extra_evidence: 4.0}
risk:
  levels: {medium: 30, high: 60, critical: 90}   # a new browser (25) stays low
  rules:
    velocity: {window_s: 3600, max_sessions: 1000, score: 20}
    failed_attempts: {per_failure: 0, max: 0}      # the refusal tests fail on purpose, many times
lockout: {max_failures: 100, max_failures_with_liveness: 100, delay_after: 100, delay_s: 0.0}
"""


# The same with a bind_device action: a second device is bound only in a session of it, confirmed
# by a push to the bound one and the SMS code.
BIND_TENANT = "push-bind-bank"
BIND_POLICY = PUSH_POLICY.replace("version: push-test-1", "version: push-bind-test-1").replace("""cooling_off:""", """\
  bind_device:
    required: 6.0
    acceptable: [[push, sms_otp]]
cooling_off:""")


@contextmanager
def push_server(root: Path, backend: str):
    """(harness, stub, orchestrator): one MFA server on SQLite or PostgreSQL for a module."""
    with (_fresh_schema() if backend == "postgres" else _no_schema()) as dsn:
        policies = root / "policies"
        policies.mkdir(parents=True, exist_ok=True)
        (policies / f"{TENANT}.yaml").write_text(PUSH_POLICY)
        (policies / f"{BIND_TENANT}.yaml").write_text(BIND_POLICY)
        settings = make_settings(root / "data", storage={"dsn": dsn},
                                 mfa={"policy_dir": str(policies), "policy_check_s": 0},
                                 clients={"face": {"target": DEAD, "deadline_s": 2, "retries": 0},
                                          "voice": {"target": DEAD, "deadline_s": 2, "retries": 0}})
        harness = ServiceHarness(settings)
        harness.start("mfa")
        try:
            with harness.channel("mfa", "dev-all") as channel:
                yield harness, mfa_pb2_grpc.MfaServiceStub(channel), harness.running["mfa"].definition.service
        finally:
            harness.stop()


@contextmanager
def held_clock(orch):
    """The running server's clock, held still (a tests.mfa.conftest.Clock) and given back afterwards."""
    from tests.mfa.conftest import Clock

    saved, clock = orch.clock, Clock()
    orch.clock = orch.registry.clock = clock
    try:
        yield clock
    finally:
        orch.clock = orch.registry.clock = saved


@contextmanager
def _no_schema():
    yield ""


class PushApp(App):
    """The customer's app: a bound key, a push token, and answers to the confirmations it receives."""

    def __init__(self, install: str = "inst-push-1", **kw) -> None:
        from tests.mfa.conftest import phone_device

        super().__init__(phone_device(install=install), **kw)
        self.push_token = f"fcm-token-{install}"

    def fetch_request(self, data: dict, device_id: str | None = None, passkey=None) -> F.GetPushConfirmationRequest:
        """The signed request for the fields of the confirmation a push's ``data`` names (ids only);
        ``device_id``: another id than its own (a forgery); ``passkey``: a passkey's assertion
        (tests.mfa.authenticator.SoftAuthenticator) instead of the key's signature."""
        from services.mfa.push.confirmation import fetch_context

        device_id = device_id or self.device_id
        context = fetch_context(data["sid"], data["cid"], device_id)
        req = F.GetPushConfirmationRequest(session_id=data["sid"], confirmation_id=data["cid"], device_id=device_id)
        if passkey is not None:
            req.webauthn.CopyFrom(passkey.assert_context(context))
        else:
            req.signature = self.sign(context)
        return req

    def answer(self, fields: dict, number: str, answer: str = "approve", device_id: str | None = None,
               **changed) -> F.PushAnswer:
        """The signed answer to a confirmation whose shown ``fields`` the push carried; ``changed``
        replaces fields (what a tampered screen showed the customer)."""
        context = canonical_json({**fields, **changed, "answer": answer, "number": number})
        return F.PushAnswer(confirmation_id=fields["cid"], device_id=device_id or self.device_id, context=context,
                            signature=self.sign(context))


def start(stub, app, ref, action="login", amount=None, payee=None, channel=F.CHANNEL_APP, device=None,
          country="", metadata=()):
    req = F.StartAuthenticationRequest(subject=ref, channel=channel, action=action,
                                       device=device if device is not None else app.device,
                                       context=F.ContextSignals(country=country))
    if amount is not None:
        req.amount.CopyFrom(F.Money(currency="CNY", amount_minor=amount))
        req.payee.CopyFrom(payee or PAYEE)
    return app.opened(req, stub.StartAuthentication(req, metadata=metadata))


def otp(stub, settings, session_id, payee=None):
    """The SMS code sent and entered; ``payee``: the payment session's, which SendOtp names."""
    stub.SendOtp(F.SendOtpRequest(session_id=session_id, payee=payee))
    return stub.SubmitFactor(F.SubmitFactorRequest(session_id=session_id, otp=F.OtpEvidence(code=outbox_codes(settings)[-1])))


def customer(stub, settings, sid: str, *apps: PushApp, tenant: str = TENANT):
    """A subject with a phone number and ``apps`` bound (an SMS login on each), with their push tokens."""
    ref = setup_subject(stub, subject(tenant, sid))
    for app in apps:
        bind(stub, settings, ref, app)
    return ref


def bind(stub, settings, ref, app: PushApp) -> str:
    s = start(stub, app, ref)
    otp(stub, settings, s.session_id)
    assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
    app.device_id = stub.RegisterDevice(F.RegisterDeviceRequest(
        session_id=s.session_id, device=app.device, public_key=app.public_der, label="phone")).device_id
    stub.SetPushToken(F.SetPushTokenRequest(subject=ref, device_id=app.device_id, push_token=app.push_token))
    return app.device_id


def browser() -> F.DeviceInfo:
    return F.DeviceInfo(platform="web", model="firefox 133", os_version="linux", locale="fr_FR",
                        timezone="Europe/Paris", screen_width=1920, screen_height=1080)


def pushes(settings) -> list[dict]:
    path = settings.data_dir / "push-outbox.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def push_for(settings, confirmation_id: str) -> dict:
    """The data of the last push (development sink) that named a confirmation."""
    for entry in reversed(pushes(settings)):
        if entry["data"].get("cid") == confirmation_id:
            return entry["data"]
    raise AssertionError(f"no push named {confirmation_id}")


def shown_fields(stub, settings, app: PushApp, confirmation_id: str, passkey=None) -> dict:
    """The fields ``app`` is shown for a confirmation: the push names it, the app reads it from the
    MFA with GetPushConfirmation, signed by its bound key (or ``passkey``)."""
    got = stub.GetPushConfirmation(app.fetch_request(push_for(settings, confirmation_id), passkey=passkey))
    return json.loads(got.fields)


def fcm_problems(path: str, headers, body: bytes, project: str, access_token: str) -> list[str]:
    """What in a request differs from FCM HTTP v1's documented messages:send request
    (https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send)."""
    problems = []
    if path != f"/v1/projects/{project}/messages:send":
        problems.append(f"path {path}")
    if headers.get("Authorization") != f"Bearer {access_token}":
        problems.append("no OAuth 2.0 bearer token")
    if not (headers.get("Content-Type") or "").startswith("application/json"):
        problems.append("not JSON")
    try:
        doc = json.loads(body)
    except ValueError:
        return problems + ["body is not JSON"]
    msg = doc.get("message") if isinstance(doc, dict) else None
    if not isinstance(msg, dict) or set(doc) != {"message"}:
        return problems + ["the body must be {\"message\": {...}}"]
    unknown = set(msg) - {"name", "data", "notification", "android", "webpush", "apns", "fcm_options",
                          "token", "topic", "condition"}
    if unknown:
        problems.append(f"unknown message fields {sorted(unknown)}")
    if sum(k in msg for k in ("token", "topic", "condition")) != 1 or not isinstance(msg.get("token"), str):
        problems.append("exactly one target, a token string")
    data = msg.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        problems.append("data values must be strings")
    reserved = {k for k in data if k in ("from", "notification", "message_type") or k.startswith(("google", "gcm"))}
    if reserved:
        problems.append(f"reserved data keys {sorted(reserved)}")
    android = msg.get("android", {})
    if android.get("priority") not in (None, "NORMAL", "HIGH"):
        problems.append("android.priority must be NORMAL or HIGH")
    if "ttl" in android and not re.fullmatch(r"\d+(\.\d{1,9})?s", str(android["ttl"])):
        problems.append("android.ttl must be a duration like '90s'")
    apns = msg.get("apns", {})
    if not all(isinstance(v, str) for v in apns.get("headers", {}).values()):
        problems.append("apns.headers values must be strings")
    if "payload" in apns and not isinstance(apns["payload"].get("aps"), dict):
        problems.append("apns.payload must hold an aps dictionary")
    if len(body) > 4096 + 1024:
        problems.append("over FCM's 4 KB message limit")
    return problems


class FcmServer:
    """A local stand-in for FCM's HTTP v1 endpoint that answers like FCM: 200 with the message
    name for a request of the documented shape, 400 INVALID_ARGUMENT naming what is wrong, or
    ``fail_with`` (503, 404 UNREGISTERED...) when a test sets it."""

    def __init__(self, project: str, access_token: str) -> None:
        self.project, self.access_token = project, access_token
        self.requests: list[dict] = []
        self.fail_with = 0
        self.delay = threading.Event()  # set: answer at once; clear: hold the answer (a timeout)
        self.delay.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                problems = fcm_problems(self.path, self.headers, body, outer.project, outer.access_token)
                outer.requests.append({"path": self.path, "body": json.loads(body) if not problems else body,
                                       "problems": problems})
                outer.delay.wait(10)
                if outer.fail_with:
                    self._reply(outer.fail_with, {"error": {"code": outer.fail_with, "status": "UNAVAILABLE"}})
                elif problems:
                    self._reply(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": problems}})
                else:
                    self._reply(200, {"name": f"projects/{outer.project}/messages/{len(outer.requests)}"})

            def _reply(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FcmServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.delay.set()
        self.server.shutdown()
        self.server.server_close()


def service_account_key(path: Path, token_uri: str = "https://oauth2.googleapis.com/token", key=None) -> Path:
    """A Google service-account JSON key (what the FCM adapter reads) for ``key`` (RSA, made when
    None), naming ``token_uri``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "bank-app", "private_key_id": "k1", "client_id": "1",
        "private_key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode(),
        "client_email": "biogate-push@bank-app.iam.gserviceaccount.com", "token_uri": token_uri}))
    return path
