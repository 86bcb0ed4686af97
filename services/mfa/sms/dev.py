"""Development SMS sink: appends each message to a JSON-lines outbox file (the masked number and
the text) and logs it with the number masked and the code hidden. Never for production: the
outbox holds the codes."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from services.common.privacy import mask_phone

log = logging.getLogger("biogate.mfa.sms")


class DevSmsSink:
    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self._lock = threading.Lock()

    def send(self, to_e164: str, text: str, idempotency_key: str) -> str:
        message_id = "dev-" + uuid.uuid4().hex
        entry = {"id": message_id, "to": mask_phone(to_e164), "text": text, "key": idempotency_key,
                 "ts": datetime.now(timezone.utc).isoformat()}
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.outbox, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        log.info("sms (development sink)", extra={"to": entry["to"], "text": re.sub(r"\d", "*", text)})
        return message_id

    def messages(self) -> list[dict]:
        if not self.outbox.exists():
            return []
        return [json.loads(line) for line in self.outbox.read_text(encoding="utf-8").splitlines() if line]
