"""One JSON POST to a provider (SMS gateway, FCM) with bounded retries: timeouts, connection errors,
429 and 5xx are retried with exponential back-off; other 4xx are not (the request itself is refused)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

MAX_REPLY = 65536


def post_json(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float, retries: int, backoff_s: float,
              what: str, error: Callable[[str, bool], Exception], log: logging.Logger) -> tuple[dict[str, Any], int]:
    """(the JSON object answered, the attempt that succeeded); raises ``error(message, transient)``."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                reply = json.loads(resp.read(MAX_REPLY) or b"{}")
                return (reply if isinstance(reply, dict) else {}), attempt + 1
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code < 500 and exc.code != 429:
                raise error(f"{what} refused the message ({last})", False) from None
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            last = type(getattr(exc, "reason", exc)).__name__
        log.warning(f"{what} attempt failed", extra={"attempt": attempt + 1, "error": last})
    raise error(f"{what} failed {retries + 1} times (last: {last})", True)
