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

from services.common.outbound import PostFailed, post_json, request_once
from .base import PushError

log = logging.getLogger("biogate.mfa.push")

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


class _Answer:  # google.auth.transport.Response's three properties
    def __init__(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.status, self.headers, self.data = status, headers, data


def _bounded_transport(timeout_s: float) -> Callable[..., _Answer]:
    """google-auth's HTTP transport (the token request) through services/common/outbound.py:
    ``timeout_s`` bounds the whole request. requests, google-auth's own transport, applies a timeout
    to each socket operation: a token endpoint trickling its answer held the customer's RPC."""
    import google.auth.exceptions

    def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = None, **kwargs: object) -> _Answer:
        try:
            return _Answer(*request_once(url, body, dict(headers or {}), timeout_s, method, error_bodies=True))
        except PostFailed as exc:
            raise google.auth.exceptions.TransportError(str(exc)) from None
    return request


def service_account_tokens(key_file: Path, timeout_s: float) -> Callable[[], str]:
    """Access tokens of the service account in ``key_file`` (Google's JSON key), cached until
    google-auth judges them close to expiry, then refreshed at the key's ``token_uri``."""
    import google.auth.exceptions
    from google.oauth2 import service_account

    creds = service_account.Credentials.from_service_account_file(str(key_file), scopes=[FCM_SCOPE])
    lock = threading.Lock()
    transport = _bounded_transport(timeout_s)

    def token() -> str:
        with lock:
            if not creds.valid:
                try:
                    creds.refresh(transport)
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
