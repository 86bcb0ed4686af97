"""Push confirmation round trip (issue 17): from the bank's SendPushConfirmation to the app's
signed answer accepted by ConfirmTransaction, through a real MFA service in its own process on
loopback (bench/harness.py), with the development push sink standing for FCM and the app reading it.

Per round: a web payment session is started (not timed); then, timed, SendPushConfirmation (the
confirmation sealed in the session with its audit record and handed to the gateway), the app picking
the message up (ids only), reading the confirmation with GetPushConfirmation (signed by its key;
the MFA checks the signature, opens the sealed fields, audits), building and signing its approval
with the number the screen showed (Ed25519), and ConfirmTransaction (the push factor's checks, lockout, compare-and-swap, audit); Decide is timed
apart. The provider's own delivery time (FCM to the phone, the user reading the screen) is not in
these figures: it is the network's and the customer's, seconds, not the service's.

    .venv/bin/python -m bench.push_confirm --rounds 200 [--dsn postgresql://...] [--write]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.harness import ServiceProcess, command_line, machine, machine_line, pct, replace_section, write_json
from services.common.api.v1 import common_pb2, mfa_pb2, mfa_pb2_grpc
from services.mfa.binding import canonical_json
from services.mfa.push.confirmation import fetch_context

F = mfa_pb2
TENANT = "bench-push"
POLICY = """\
version: bench-push-1
factors:
  sms_otp: {resend_cooldown_s: 0, per_phone: {limit: 1000000, window_s: 3600}, per_subject: {limit: 1000000, window_s: 3600}}
  device: {binding: {min_acr: aal1, within_s: 300}}
  push: {ttl_s: 90, max_sends: 10, fallback: [[sms_otp]], ivr_callback: false}
actions:
  login: {required: 3.0, acceptable: [[sms_otp]]}
  payment: {required: 3.0, payee: required, acceptable: [[push], [sms_otp]]}
risk:
  levels: {medium: 30, high: 60, critical: 90}
  rules:
    velocity: {max_sessions: 1000000}
"""
PAYEE = F.Payee(name="Li Lei", account_masked="6222 **** **** 1234")


class Outbox:
    """The app's side of the development push sink: new messages since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def next(self) -> dict:
        while True:
            if self.path.exists():
                with open(self.path, "rb") as fh:
                    fh.seek(self.offset)
                    line = fh.readline()
                if line.endswith(b"\n"):
                    self.offset += len(line)
                    return json.loads(line)
            time.sleep(0.0005)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--dsn", default="", help="PostgreSQL DSN (default: SQLite in the service's data directory)")
    ap.add_argument("--json", default="")
    ap.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-push-"))
    (tmp / "policies").mkdir()
    (tmp / "policies" / f"{TENANT}.yaml").write_text(POLICY)
    config = {"storage": {"dsn": args.dsn},
              "mfa": {"policy_dir": str(tmp / "policies"), "push": {"gateway": "dev", "outbox_file": str(tmp / "push.jsonl")}},
              "clients": {"face": {"target": "127.0.0.1:9"}, "voice": {"target": "127.0.0.1:9"}}}
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    app = F.DeviceInfo(platform="android", os_version="14.2", model="Pixel 8", app_version="5.1.0", locale="zh-CN",
                       timezone="Asia/Shanghai", screen_width=1080, screen_height=2400, install_id="bench-app")
    web = F.DeviceInfo(platform="web", model="firefox 133", timezone="Asia/Shanghai", screen_width=1920,
                       screen_height=1080)
    with ServiceProcess("mfa", config, data_dir=tmp / "svc") as svc, svc.channel() as channel:
        stub = mfa_pb2_grpc.MfaServiceStub(channel)
        ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id="cust-0001")
        stub.SetPhoneNumber(F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"))
        s = stub.StartAuthentication(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login",
                                                                  device=app))
        stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
        sms = (svc.settings.data_dir / "sms-outbox.jsonl").read_text().splitlines()[-1]
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id,
                                                otp=F.OtpEvidence(code=json.loads(sms)["text"].split()[0])))
        assert stub.Decide(F.DecideRequest(session_id=s.session_id)).outcome == F.OUTCOME_ALLOW
        device_id = stub.RegisterDevice(F.RegisterDeviceRequest(session_id=s.session_id, device=app,
                                                                public_key=public, label="phone")).device_id
        stub.SetPushToken(F.SetPushTokenRequest(subject=ref, device_id=device_id, push_token="bench-fcm-token"))
        outbox = Outbox(tmp / "push.jsonl")

        def round_trip() -> tuple[float, float, float, float, int, float]:
            s = stub.StartAuthentication(F.StartAuthenticationRequest(
                subject=ref, channel=F.CHANNEL_WEB, action="payment", device=web, payee=PAYEE,
                amount=F.Money(currency="CNY", amount_minor=120000)))
            t0 = time.perf_counter()
            sent = stub.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=s.session_id, payee=PAYEE))
            t1 = time.perf_counter()
            data = outbox.next()["data"]
            c0, f0 = svc.cpu_seconds(), time.perf_counter()
            fetched = stub.GetPushConfirmation(F.GetPushConfirmationRequest(
                session_id=data["sid"], confirmation_id=data["cid"], device_id=device_id,
                signature=key.sign(fetch_context(data["sid"], data["cid"], device_id))))
            f1 = time.perf_counter()
            fetch_cpu.append(svc.cpu_seconds() - c0)
            fields = json.loads(fetched.fields)
            context = canonical_json({**fields, "answer": "approve", "number": sent.number})
            answer = F.PushAnswer(confirmation_id=sent.confirmation_id, device_id=device_id, context=context,
                                  signature=key.sign(context))
            t2 = time.perf_counter()
            r = stub.ConfirmTransaction(F.ConfirmTransactionRequest(session_id=s.session_id, answer=answer))
            t3 = time.perf_counter()
            d = stub.Decide(F.DecideRequest(session_id=s.session_id))
            t4 = time.perf_counter()
            assert r.result.passed, r.result.reasons
            return t3 - t0, t1 - t0, t3 - t2, t4 - t3, d.outcome, f1 - f0

        fetch_cpu: list[float] = []  # the service's CPU seconds during each GetPushConfirmation (/proc ticks)
        for _ in range(10):  # warm-up
            round_trip()
        fetch_cpu.clear()
        cpu0 = svc.cpu_seconds()
        rows = [round_trip() for _ in range(args.rounds)]
        service_cpu = svc.cpu_seconds() - cpu0  # the whole rounds, session start and Decide included
    report = {
        "machine": machine(), "command": command_line(), "rounds": args.rounds,
        "backend": "postgresql" if args.dsn else "sqlite",
        "allowed": sum(1 for r in rows if r[4] == F.OUTCOME_ALLOW),
        **{f"{name}_ms": {"p50": round(pct([r[i] for r in rows], 50), 2), "p99": round(pct([r[i] for r in rows], 99), 2)}
           for i, name in ((0, "round_trip"), (1, "send"), (2, "confirm"), (3, "decide"), (5, "fetch"))},
        "service_cpu_ms_per_round": round(1000 * service_cpu / args.rounds, 2),
        "service_cpu_ms_per_fetch": round(1000 * sum(fetch_cpu) / args.rounds, 2),
    }
    print(json.dumps(report, indent=1))
    write_json(args.json, report)
    if args.write:
        write_results(report)
    return 0


def write_results(r: dict) -> None:
    def row(name: str, key: str) -> str:
        return f"| {name} | {r[key]['p50']:.1f} | {r[key]['p99']:.1f} |"

    replace_section("Push confirmation (issue 17)", "\n".join([
        "## Push confirmation (issue 17)", "",
        f"`{r['command']}`: {r['rounds']} web payments confirmed on the bound app, one MFA process on loopback "
        f"({r['backend']}), development push sink standing for FCM; {machine_line(r['machine'])}. "
        f"{r['allowed']} of {r['rounds']} allowed.", "",
        "| step | p50 ms | p99 ms |", "|---|---|---|",
        row("creation to the accepted signed answer (SendPushConfirmation, the app reads, signs, ConfirmTransaction)", "round_trip_ms"),
        row("SendPushConfirmation (session, sealed fields, audit, gateway hand-over)", "send_ms"),
        row("GetPushConfirmation (the app's signed read: signature, unseal, audit)", "fetch_ms"),
        row("ConfirmTransaction (checks, signature, lockout, audit)", "confirm_ms"),
        row("Decide afterwards (signed token)", "decide_ms"), "",
        "FCM's delivery to the phone and the customer's reading time come on top: they are the network's and "
        "the customer's, not the service's. Each confirmation lives at most `factors.push.ttl_s` (default 90 s, "
        "at most 120 s).",
    ]))


if __name__ == "__main__":
    raise SystemExit(main())
