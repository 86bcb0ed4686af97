"""Firebase Cloud Messaging, HTTP v1 API: ``POST {base}/v1/projects/{project}/messages:send`` with an
OAuth 2.0 bearer token, body ``{"message": {"token", "data", "android", "apns"}}`` (data values are
strings), answered by ``{"name": "projects/{project}/messages/{id}"}``.

A confirmation is a data message at high priority whose lifetime is the confirmation's own (Android
``ttl``, APNs ``apns-expiration``), collapsed per confirmation; APNs shows a localised alert so the
app is woken to display it. Timeouts, connection errors, 429 and 5xx are retried a bounded number
of times; other 4xx (an unregistered token, a refused credential) are not.

The bearer is a service account's short-lived OAuth 2.0 access token (scope firebase.messaging),
obtained and refreshed before it expires by google-auth from the account's key file
(``service_account_tokens``); or a fixed token from the configuration when the deployment refreshes
it itself (a sidecar, workload identity). A token that cannot be obtained is a PushError: the
session falls back like on any other push outage."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from ..outbound import post_json
from .base import PushError

log = logging.getLogger("biogate.mfa.push")

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def service_account_tokens(key_file: Path, timeout_s: float) -> Callable[[], str]:
    """Access tokens of the service account in ``key_file`` (Google's JSON key), cached until
    google-auth judges them close to expiry, then refreshed at the key's ``token_uri``."""
    import google.auth.exceptions
    from google.auth.transport.requests import Request
    from google.oauth2 import service_account

    creds = service_account.Credentials.from_service_account_file(str(key_file), scopes=[FCM_SCOPE])
    lock = threading.Lock()

    class _Bounded(Request):  # google-auth's default wait is 120 s; the customer is waiting
        def __call__(self, *args, **kwargs):
            kwargs["timeout"] = timeout_s
            return super().__call__(*args, **kwargs)

    def token() -> str:
        with lock:
            if not creds.valid:
                try:
                    creds.refresh(_Bounded())
                except google.auth.exceptions.GoogleAuthError as exc:
                    raise PushError(f"FCM access token refused or unreachable: {type(exc).__name__}") from None
            return str(creds.token)
    return token


class FcmPushGateway:
    def __init__(self, project: str, access_token: str | Callable[[], str], base_url: str = "https://fcm.googleapis.com",
                 timeout_s: float = 3.0, retries: int = 1, backoff_s: float = 0.2,
                 alert_loc_key: str = "biogate_confirm_transaction") -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ValueError("the FCM base URL must be http(s)://")
        if not project:
            raise ValueError("the FCM project id is required")
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project}/messages:send"
        self.access_token = access_token if callable(access_token) else (lambda: access_token)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
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
        headers = {"Content-Type": "application/json; UTF-8", "Authorization": f"Bearer {self.access_token()}"}
        reply, attempt = post_json(self.url, body, headers, timeout_s=self.timeout_s, retries=self.retries,
                                   backoff_s=self.backoff_s, what="FCM", error=PushError, log=log)
        log.info("push sent", extra={"attempt": attempt, "collapse_key": collapse_key})
        return str(reply.get("name", ""))
