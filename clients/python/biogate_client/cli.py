"""``biogate client ...``: the SDK's flows from a shell, for integrators trying BioGate out and for
operators (reviews). Readable output, or ``--json`` (the responses as protobuf JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from ._api.v1 import mfa_pb2
from .client import BioGate, outcome_name
from .credentials import DEV_CREDENTIALS, Credentials, dev_credentials
from .dev import DEV_OUTBOX, dev_otp
from .device import Device, device_info
from .errors import BioGateError

DEVICE_KEY = Path("var/client-device.pem")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--mfa", default="127.0.0.1:50053", help="MFA service address (default %(default)s)")
    g.add_argument("--face", default="127.0.0.1:50051", help="face service address (default %(default)s)")
    g.add_argument("--voice", default="127.0.0.1:50052", help="voice service address (default %(default)s)")
    g.add_argument("--token", default="", help="bearer token (default: --role's token from --credentials)")
    g.add_argument("--credentials", type=Path, default=None,
                   help=f"development credentials file (default <data_dir>/dev-credentials.json, {DEV_CREDENTIALS})")
    g.add_argument("--role", default="dev-all", help="which development token (default %(default)s)")
    g.add_argument("--ca", type=Path, help="CA certificate of the services (TLS)")
    g.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    g.add_argument("--key", type=Path, help="client certificate's key (mTLS)")
    p.add_argument("--json", action="store_true", help="print the responses as JSON")
    p.add_argument("--tenant", default="bank-a", help="tenant id (default %(default)s)")
    return p


def register(subparsers) -> None:
    """Adds the ``client`` group to a parser's subcommands (services/cli.py, or :func:`main`)."""
    client = subparsers.add_parser("client", help="call the running services through the client SDK")
    sub = client.add_subparsers(dest="client_command", required=True, metavar="COMMAND")
    common = _common()

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=lambda settings, args: run(func, settings, args))
        return p

    p = cmd("consent", consent, "record the subject's consent to biometric verification (and a phone number)")
    p.add_argument("--subject", required=True)
    p.add_argument("--modalities", default="face,voice")
    p.add_argument("--policy-version", default="privacy-2025-01")
    p.add_argument("--phone", help="E.164 number for SMS codes")
    for modality in ("face", "voice"):
        p = cmd(f"enrol-{modality}", enrol, f"enrol {modality} samples of a subject")
        p.add_argument("--subject", required=True)
        p.add_argument("files", nargs="+", type=Path)
        p.set_defaults(modality=modality)
    p = cmd("verify-face", verify_face, "1:1 face verification with passive liveness")
    p.add_argument("--subject", required=True)
    p.add_argument("image", type=Path)
    p = cmd("voice-challenge", voice_challenge, "digits to say, and the nonce verify-voice quotes")
    p.add_argument("--subject", required=True)
    p = cmd("verify-voice", verify_voice, "1:1 voice verification of a recording answering a challenge")
    p.add_argument("--subject", required=True)
    p.add_argument("--nonce", default="", help="the voice-challenge nonce the recording answers")
    p.add_argument("audio", type=Path)
    p = cmd("login", login, "a login from the customer's app: selfie, SMS code when asked, signed decision")
    p.add_argument("--subject", required=True)
    p.add_argument("--selfie", type=Path, help="face image the app captured")
    p.add_argument("--device-key", type=Path, default=DEVICE_KEY,
                   help="the app's signing key, created if missing (default %(default)s)")
    p.add_argument("--otp", help="the SMS code (default: read from the development SMS outbox)")
    p.add_argument("--outbox", type=Path, help="development SMS outbox (default <data_dir>/sms-outbox.jsonl)")
    p.add_argument("--text", default="", help="chat/IVR transcript for the risk rules")
    p.add_argument("--bind", action="store_true", help="bind the app's key after an ALLOW")
    p = cmd("review", reviews, "the human review queue: list, show one, or resolve one")
    p.add_argument("action", choices=("list", "show", "resolve"))
    p.add_argument("review_id", nargs="?")
    p.add_argument("--status", default="pending")
    verdict = p.add_mutually_exclusive_group()
    verdict.add_argument("--approve", action="store_true")
    verdict.add_argument("--reject", action="store_true")
    p.add_argument("--note", default="")
    p = cmd("delete", delete, "erase the subject in every modality")
    p.add_argument("--subject", required=True)
    p.add_argument("--reason", default="erasure-request")


# ---------------------------------------------------------------------- running a command
class Out:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.records: list[dict[str, Any]] = []

    def __call__(self, step: str, text: str, message: Message | dict | None = None) -> None:
        if self.as_json:
            body = MessageToDict(message) if isinstance(message, Message) else (message or {})
            self.records.append({"step": step, **body})
        else:
            print(f"{step}: {text}")

    def flush(self) -> None:
        if self.as_json and self.records:
            print(json.dumps(self.records[0] if len(self.records) == 1 else self.records, indent=2, ensure_ascii=False))


def _data_dir(settings, args) -> Path:
    """The server settings' data directory under `biogate client`, var/ under `biogate-client`."""
    return Path(getattr(settings, "data_dir", None) or "var")


def connect(settings, args) -> BioGate:
    if args.token or args.ca:
        creds = Credentials(args.token, args.ca, args.cert, args.key)
    else:
        creds = dev_credentials(args.credentials or _data_dir(settings, args) / DEV_CREDENTIALS.name, args.role)
    return BioGate(args.mfa, args.face, args.voice, creds)


def run(func, settings, args) -> int:
    out = Out(args.json)
    try:
        with connect(settings, args) as bg:
            code = func(bg, args, out, settings)
    except BioGateError as err:
        out("error", str(err), {"code": err.code.name, "reason": err.reason, "message": err.message,
                                "fields": err.fields, "retryDelayS": err.retry_delay_s})
        out.flush()
        return 2
    out.flush()
    return code


def _reasons(message) -> str:
    return ", ".join(r.code for r in message.reasons) or "-"


# ---------------------------------------------------------------------- the commands
def consent(bg: BioGate, args, out: Out, settings) -> int:
    c = bg.record_consent(args.tenant, args.subject, args.modalities.split(","), args.policy_version)
    out("consent", f"recorded for {args.subject} ({args.modalities})", c)
    if args.phone:
        masked = bg.set_phone(args.tenant, args.subject, args.phone)
        out("phone", f"stored {masked}", {"maskedPhone": masked})
    return 0


def enrol(bg: BioGate, args, out: Out, settings) -> int:
    data = [f.read_bytes() for f in args.files]
    if args.modality == "face":
        r: Any = bg.enrol_face(args.tenant, args.subject, data)
        quality = r.images
    else:
        r = bg.enrol_voice(args.tenant, args.subject, data)
        quality = r.utterances
    accepted = sum(q.accepted for q in quality)
    out(f"enrol-{args.modality}", f"{args.subject}: {accepted} of {len(data)} samples accepted", r)
    return 0 if accepted else 1


def verify_face(bg: BioGate, args, out: Out, settings) -> int:
    r = bg.verify_face(args.tenant, args.subject, args.image.read_bytes())
    out("verify-face", f"{'MATCH' if r.match else 'NO MATCH'} score {r.score:.3f} (threshold {r.threshold:.3f}), "
        f"live {r.live}; reasons {_reasons(r)}", r)
    return 0 if r.match else 1


def voice_challenge(bg: BioGate, args, out: Out, settings) -> int:
    r = bg.voice_challenge(args.tenant, args.subject)
    out("voice-challenge", f"say {r.digits}; nonce {r.challenge.nonce}", r)
    return 0


def verify_voice(bg: BioGate, args, out: Out, settings) -> int:
    r = bg.verify_voice(args.tenant, args.subject, args.audio.read_bytes(), args.nonce)
    out("verify-voice", f"{'MATCH' if r.match else 'NO MATCH'} score {r.score:.3f} (threshold {r.threshold:.3f}); "
        f"reasons {_reasons(r)}", r)
    return 0 if r.match else 1


def _outbox(settings, args) -> Path:
    """Where the development SMS sink writes: --outbox, the configured mfa.sms.outbox_file, or
    <data_dir>/sms-outbox.jsonl."""
    configured = getattr(getattr(getattr(settings, "mfa", None), "sms", None), "outbox_file", None)
    return args.outbox or configured or _data_dir(settings, args) / DEV_OUTBOX.name


def _device(path: Path) -> Device:
    if path.exists():
        return Device.load(path, device_info(f"cli-{path.stem}"))
    device = Device(device_info(f"cli-{path.stem}"))
    device.save(path)
    return device


def login(bg: BioGate, args, out: Out, settings) -> int:
    device = _device(args.device_key)
    s = bg.start(args.tenant, args.subject, device, conversation_text=args.text)
    out("start", f"session {s.id}, risk {s.started.risk.score:.0f}, device bound {s.started.device_bound}", s.started)
    if args.selfie:
        r = s.submit_face(args.selfie.read_bytes())
        out("face", f"passed {r.passed} (llr {r.llr:.2f}, binding {r.binding}); reasons {_reasons(r)}", r)
    d = s.decide()
    if d.outcome == mfa_pb2.OUTCOME_STEP_UP and any(mfa_pb2.FACTOR_TYPE_SMS_OTP in fs.factors for fs in d.still_needed):
        sent = s.send_otp()
        out("sms", f"code sent to {sent.masked_phone}", sent)
        code = args.otp or dev_otp(_outbox(settings, args), sent.masked_phone)
        r = s.submit_otp(code)
        out("otp", f"passed {r.passed}; reasons {_reasons(r)}", r)
        d = s.decide()
    out("decision", f"{outcome_name(d.outcome)} acr {d.acr or '-'} amr {','.join(d.amr) or '-'}; reasons {_reasons(d)}"
        + (f"; review {d.review_id}" if d.review_id else ""), d)
    if d.token:
        claims = bg.verify_token(d.token, args.tenant, session_id=s.id)
        out("token", f"signature verified: decision {claims.get('decision')}, expires {claims['exp']}", claims)
    if args.bind and d.outcome == mfa_pb2.OUTCOME_ALLOW:
        device_id = s.register_device("cli")
        device.save(args.device_key)
        out("device", f"bound {device_id}", {"deviceId": device_id})
    return 0 if d.outcome == mfa_pb2.OUTCOME_ALLOW else 1


def reviews(bg: BioGate, args, out: Out, settings) -> int:
    if args.action == "list":
        found = bg.list_reviews(args.tenant, args.status)
        if args.json:
            print(json.dumps([MessageToDict(r) for r in found], indent=2, ensure_ascii=False))
            return 0
        for r in found:
            out("review", f"{r.review_id} {r.status} {r.action} {r.subject.subject_id}: {_reasons(r)}", r)
        if not found:
            print(f"no {args.status} reviews")
        return 0
    if not args.review_id:
        raise SystemExit(f"biogate client review {args.action} REVIEW_ID")
    if args.action == "show":
        got = bg.get_review(args.review_id)
        r = got.review
        out("review", f"{r.review_id} {r.status} {r.action} {r.subject.subject_id} ({got.channel}): {_reasons(r)}; "
            f"decision {outcome_name(got.decision.outcome)}", got)
        return 0
    if not (args.approve or args.reject):
        raise SystemExit("biogate client review resolve REVIEW_ID --approve|--reject [--note TEXT]")
    done = bg.resolve_review(args.review_id, args.approve, args.note)
    out("review", f"{done.review.review_id} {done.review.status} by {done.review.resolved_by}: final decision "
        f"{outcome_name(done.decision.outcome)}" + (" (signed token)" if done.decision.token else ""), done)
    return 0


def delete(bg: BioGate, args, out: Out, settings) -> int:
    r = bg.delete_subject(args.tenant, args.subject, args.reason)
    out("delete", f"{args.subject}: {r.templates_deleted} templates, {r.devices_deleted} devices erased, "
        f"contact erased {r.contact_erased}", r)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``biogate-client ...``: the same commands without the biogate server package's CLI."""
    parser = argparse.ArgumentParser(prog="biogate-client")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["client", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(None, args) or 0)


if __name__ == "__main__":
    sys.exit(main())
