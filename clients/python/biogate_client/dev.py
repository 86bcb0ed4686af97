"""Development helpers: the one-time codes and push messages the development sinks write instead of sending."""

from __future__ import annotations

import json
from pathlib import Path

DEV_OUTBOX = Path("var/sms-outbox.jsonl")
DEV_PUSH_OUTBOX = Path("var/push-outbox.jsonl")


def dev_otp(outbox: Path | str = DEV_OUTBOX, masked_phone: str = "") -> str:
    """The newest code the development SMS sink wrote (``mfa.sms.gateway: dev``, the default; the
    outbox is ``<data_dir>/sms-outbox.jsonl``), to the number SendOtp masked if given."""
    path = Path(outbox)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for line in reversed(lines):
        entry = json.loads(line) if line else {}
        if entry and (not masked_phone or entry.get("to") == masked_phone):
            return entry["text"].split()[0]
    raise LookupError(f"no SMS{' to ' + masked_phone if masked_phone else ''} in {path}")


def dev_push(outbox: Path | str = DEV_PUSH_OUTBOX, confirmation_id: str = "") -> dict[str, str]:
    """The data of the newest push the development push sink wrote (``mfa.push.gateway: dev``, the
    default; ``<data_dir>/push-outbox.jsonl``), for ``confirmation_id`` if given: what the app
    receives (ids only), to read with :meth:`biogate_client.Device.push_fetch`."""
    path = Path(outbox)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for line in reversed(lines):
        data = json.loads(line)["data"] if line else {}
        if data and (not confirmation_id or data.get("cid") == confirmation_id):
            return data
    raise LookupError(f"no push{' for ' + confirmation_id if confirmation_id else ''} in {path}")
