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
from datetime import datetime, timezone

from ..outbound import post_json
from .base import PushError

log = logging.getLogger("biogate.mfa.push")


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
        reply, attempt = post_json(self.url, body, headers, timeout_s=self.timeout_s, retries=self.retries,
                                   backoff_s=self.backoff_s, what="FCM", error=PushError, log=log)
        log.info("push sent", extra={"attempt": attempt, "collapse_key": collapse_key})
        return str(reply.get("name", ""))
