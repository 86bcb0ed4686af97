"""A generic HTTP SMS API: POST JSON ``{"to", "text", "sender"}`` with a bearer token and an
``Idempotency-Key`` header, answered by JSON ``{"id": ...}``. Timeouts, connection errors and 5xx
answers are retried a bounded number of times with the same key (so the gateway can drop a
duplicate); 4xx answers are not retried."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

from services.common.privacy import mask_phone

from .base import SmsError

log = logging.getLogger("biogate.mfa.sms")


class HttpSmsGateway:
    def __init__(self, url: str, token: str = "", sender: str = "BioGate", timeout_s: float = 5.0,
                 retries: int = 2, backoff_s: float = 0.5) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError("the SMS gateway URL must be http(s)://")
        self.url, self.token, self.sender = url, token, sender
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def send(self, to_e164: str, text: str, idempotency_key: str) -> str:
        body = json.dumps({"to": to_e164, "text": text, "sender": self.sender}).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    reply = json.loads(resp.read(65536) or b"{}")
                    message_id = str(reply.get("id", "")) if isinstance(reply, dict) else ""
                    log.info("sms sent", extra={"to": mask_phone(to_e164), "attempt": attempt + 1})
                    return message_id
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:
                    raise SmsError(f"the SMS gateway refused the message ({last})", transient=False) from None
            except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
                last = type(getattr(exc, "reason", exc)).__name__
            log.warning("sms gateway attempt failed", extra={"attempt": attempt + 1, "error": last})
        raise SmsError(f"the SMS gateway failed {self.retries + 1} times (last: {last})")
