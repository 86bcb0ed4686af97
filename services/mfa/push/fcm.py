"""Firebase Cloud Messaging, HTTP v1 API: ``POST {base}/v1/projects/{project}/messages:send`` with an
OAuth 2.0 bearer token, body ``{"message": {"token", "data", "android", "apns"}}`` (data values are
strings), answered by ``{"name": "projects/{project}/messages/{id}"}``.

A confirmation is a data message at high priority whose lifetime is the confirmation's own (Android
``ttl``, APNs ``apns-expiration``), collapsed per confirmation; APNs shows a localised alert so the
app is woken to display it. Timeouts, connection errors, 429 and 5xx are retried a bounded number
of times; other 4xx (an unregistered token, a refused credential) are not. The access token comes
from the configuration (the deployment refreshes it: a service account's short-lived token)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

from .base import PushError

log = logging.getLogger("biogate.mfa.push")
MAX_REPLY = 65536


class FcmPushGateway:
    def __init__(self, project: str, access_token: str, base_url: str = "https://fcm.googleapis.com",
                 timeout_s: float = 3.0, retries: int = 1, backoff_s: float = 0.2,
                 alert_loc_key: str = "biogate_confirm_transaction") -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ValueError("the FCM base URL must be http(s)://")
        if not project:
            raise ValueError("the FCM project id is required")
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project}/messages:send"
        self.access_token, self.timeout_s, self.retries, self.backoff_s = access_token, timeout_s, retries, backoff_s
        self.alert_loc_key = alert_loc_key

    def message(self, token: str, data: dict[str, str], ttl_s: int, collapse_key: str) -> dict:
        expires = int(datetime.now(timezone.utc).timestamp()) + ttl_s
        return {"message": {
            "token": token,
            "data": {str(k): str(v) for k, v in data.items()},
            "android": {"priority": "HIGH", "ttl": f"{ttl_s}s", "collapse_key": collapse_key},
            "apns": {"headers": {"apns-priority": "10", "apns-push-type": "alert",
                                 "apns-expiration": str(expires), "apns-collapse-id": collapse_key[:64]},
                     "payload": {"aps": {"alert": {"loc-key": self.alert_loc_key}, "mutable-content": 1,
                                         "sound": "default"}}},
        }}

    def send(self, token: str, data: dict[str, str], ttl_s: int, collapse_key: str) -> str:
        body = json.dumps(self.message(token, data, ttl_s, collapse_key)).encode()
        headers = {"Content-Type": "application/json; UTF-8", "Authorization": f"Bearer {self.access_token}"}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    reply = json.loads(resp.read(MAX_REPLY) or b"{}")
                    name = str(reply.get("name", "")) if isinstance(reply, dict) else ""
                    log.info("push sent", extra={"attempt": attempt + 1, "collapse_key": collapse_key})
                    return name
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:
                    raise PushError(f"FCM refused the message ({last})", transient=False) from None
            except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
                last = type(getattr(exc, "reason", exc)).__name__
            log.warning("push attempt failed", extra={"attempt": attempt + 1, "error": last})
        raise PushError(f"FCM failed {self.retries + 1} times (last: {last})")
