"""`biogate client ...` against a real MFA server: consent, an SMS-code login, the review queue and
a refusal, readable and as JSON."""

from __future__ import annotations

import json

from biogate_client.cli import main
from services.cli import build_parser


def cli(env, capsys, *argv: str) -> tuple[int, str]:
    """`biogate-client ...` in-process (the same commands as `biogate client ...`)."""
    code = main([*argv, "--mfa", env.address, "--face", "127.0.0.1:9", "--voice", "127.0.0.1:9",
                 "--credentials", str(env.settings.dev_credentials_file), "--tenant", "otp-bank"])
    return code, capsys.readouterr().out


def test_consent_and_an_sms_code_login_from_the_command_line(mfa_only, capsys, tmp_path):
    code, out = cli(mfa_only, capsys, "consent", "--subject", "cli-cust-1", "--phone", "+8613800200001")
    assert code == 0 and "consent: recorded for cli-cust-1" in out and "+86 *** **** 0001" in out
    assert "8613800200001" not in out
    key = tmp_path / "phone.pem"
    code, out = cli(mfa_only, capsys, "login", "--subject", "cli-cust-1", "--device-key", str(key),
                    "--outbox", str(mfa_only.outbox), "--bind", "--json")
    steps = {r["step"]: r for r in json.loads(out)}
    assert code == 0, out
    assert steps["decision"]["outcome"] == "OUTCOME_ALLOW" and steps["token"]["decision"] == "allow"
    assert steps["otp"]["passed"] is True and steps["device"]["deviceId"]
    assert key.exists() and (tmp_path / "phone.pem.id").read_text() == steps["device"]["deviceId"]


def test_the_review_queue_from_the_command_line(mfa_only, capsys, tmp_path):
    key = tmp_path / "phone.pem"
    cli(mfa_only, capsys, "consent", "--subject", "cli-cust-2", "--phone", "+8613800200002")
    cli(mfa_only, capsys, "login", "--subject", "cli-cust-2", "--device-key", str(key), "--outbox",
        str(mfa_only.outbox), "--bind")
    # a bound phone on a high-risk session: the device proof and the SMS code, then review
    from biogate_client import Device, device_info, dev_otp

    phone = Device.load(key, device_info(f"cli-{key.stem}"))
    s = mfa_only.client.start("otp-bank", "cli-cust-2", phone, conversation_text="AnyDesk remote access please")
    s.submit_device()
    s.submit_otp(dev_otp(mfa_only.outbox, s.send_otp().masked_phone))
    review_id = s.decide().review_id
    assert review_id
    code, out = cli(mfa_only, capsys, "review", "list", "--json")
    assert code == 0 and review_id in [r["reviewId"] for r in json.loads(out)]
    code, out = cli(mfa_only, capsys, "review", "show", review_id)
    assert code == 0 and f"review: {review_id} pending login cli-cust-2 (app)" in out and "decision REVIEW" in out, out
    code, out = cli(mfa_only, capsys, "review", "resolve", review_id, "--approve", "--note", "called back")
    assert code == 0 and f"review: {review_id} approved by dev-all: final decision ALLOW (signed token)" in out, out
    code, out = cli(mfa_only, capsys, "review", "resolve", review_id, "--reject", "--json")
    error = json.loads(out)
    assert code == 2 and error["code"] == "FAILED_PRECONDITION" and error["reason"] == "REVIEW_ALREADY_RESOLVED", out


def test_a_refusal_is_one_readable_line_with_its_reason(mfa_only, capsys):
    code, out = cli(mfa_only, capsys, "consent", "--subject", "13800135678")
    assert code == 2 and out.startswith("error: INVALID_ARGUMENT PERSONAL_NUMBER_AS_ID:"), out
    assert "13800135678" not in out


def test_the_biogate_command_line_has_the_client_group():
    args = build_parser().parse_args(["client", "login", "--subject", "cust-1", "--selfie", "me.jpg", "--json"])
    assert (args.command, args.client_command, args.subject, args.json) == ("client", "login", "cust-1", True)

