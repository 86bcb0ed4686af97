"""A generic HTTP SMS API: POST JSON ``{"to", "text", "sender"}`` with a bearer token and an
``Idempotency-Key`` header, answered by JSON ``{"id": ...}``. Timeouts, connection errors and 5xx
answers are retried a bounded number of times with the same key (so the gateway can drop a
duplicate); 4xx answers are not retried."""

from __future__ import annotations

import json
import logging

from services.common.outbound import post_json
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
        reply, attempt = post_json(self.url, body, headers, timeout_s=self.timeout_s, retries=self.retries,
                                   backoff_s=self.backoff_s, what="the SMS gateway", error=SmsError, log=log)
        log.info("sms sent", extra={"to": mask_phone(to_e164), "attempt": attempt})
        return str(reply.get("id", ""))
