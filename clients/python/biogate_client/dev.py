"""Development helpers: the one-time codes the development SMS sink writes instead of sending."""

from __future__ import annotations

import json
from pathlib import Path

DEV_OUTBOX = Path("var/sms-outbox.jsonl")


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
