"""Outbound HTTP POSTs to providers and the bank (SMS gateway, FCM, review webhooks): one request
(:func:`post_once`, redirects refused: urllib would replay a POST as a bodiless GET), and a JSON POST
with bounded retries (:func:`post_json`): timeouts, connection errors, 429 and 5xx are retried with
exponential back-off; other 4xx are not (the request itself is refused)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

MAX_REPLY = 65536


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


class PostFailed(Exception):
    """What went wrong (``HTTP 503``, ``TimeoutError``...), and whether a retry may succeed."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def post_once(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> bytes:
    """The reply's body (at most MAX_REPLY bytes) of a 2xx answer; raises PostFailed otherwise."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            return bytes(resp.read(MAX_REPLY))
    except urllib.error.HTTPError as exc:
        raise PostFailed(f"HTTP {exc.code}", exc.code >= 500 or exc.code == 429) from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        raise PostFailed(type(getattr(exc, "reason", exc)).__name__, True) from None


def post_json(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float, retries: int, backoff_s: float,
              what: str, error: Callable[[str, bool], Exception], log: logging.Logger) -> tuple[dict[str, Any], int]:
    """(the JSON object answered, the attempt that succeeded); raises ``error(message, transient)``."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            reply = json.loads(post_once(url, body, headers, timeout_s) or b"{}")
            return (reply if isinstance(reply, dict) else {}), attempt + 1
        except PostFailed as exc:
            last = str(exc)
            if not exc.transient:
                raise error(f"{what} refused the message ({last})", False) from None
        except ValueError as exc:  # a reply that is not JSON
            last = type(exc).__name__
        log.warning(f"{what} attempt failed", extra={"attempt": attempt + 1, "error": last})
    raise error(f"{what} failed {retries + 1} times (last: {last})", True)
