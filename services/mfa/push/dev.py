"""Development push sink: appends each message (the token's hash, never the token, and the data)
to a JSON-lines outbox, where a test or a developer's simulated app picks it up. Never for production."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path


class DevPushSink:
    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self._lock = threading.Lock()

    def send(self, token: str, data: dict[str, str], ttl_s: int, collapse_key: str) -> str:
        message_id = "dev-" + uuid.uuid4().hex
        entry = {"id": message_id, "token_sha256": hashlib.sha256(token.encode()).hexdigest(), "data": data,
                 "ttl_s": ttl_s, "collapse_key": collapse_key, "ts": datetime.now(timezone.utc).isoformat()}
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.outbox, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return message_id

    def messages(self) -> list[dict]:
        if not self.outbox.exists():
            return []
        return [json.loads(line) for line in self.outbox.read_text(encoding="utf-8").splitlines() if line]
