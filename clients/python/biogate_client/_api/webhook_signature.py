# Copied by services/common/api/generate.py from services/common/webhook_signature.py. Do not edit.
"""The signature of BioGate's webhooks, both halves: :func:`signature` (what the MFA's outbox sends)
and :func:`verify` (what the bank's receiver does with it), shared by the services and the client SDK.

Each request carries ``BioGate-Event-Id`` and ``BioGate-Signature: t=<unix time>,v1=<hex>[,v1=<hex>...]``:
one HMAC-SHA256 of ``<t>.<body>`` per active secret, newest first (the scheme of Stripe's webhooks
and Standard Webhooks). While a secret is being rotated both the new and the old one sign, so the
receiver moves to the new one when it is ready; once the old one is removed from the configuration
its signature is no longer sent. The receiver recomputes the HMAC over the raw body under each
secret it knows, accepts when any of them equals any ``v1`` given (compared in constant time), and
refuses a timestamp outside its tolerance (replays).

This file is the one source: ``python -m services.common.api.generate`` copies it into
clients/python/biogate_client/_api/webhook_signature.py (``biogate_client.webhooks``), so that a
bank verifies with the code BioGate signs with. It therefore imports only the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

SIGNATURE_HEADER = "BioGate-Signature"
EVENT_HEADER = "BioGate-Event-Id"
TOLERANCE_S = 300
# A header naming more signatures than any sender rotating its keys needs is refused before any HMAC is
# computed: each one costs the receiver a comparison with every secret it knows.
MAX_SIGNATURES = 8

_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def _keys(secrets: str | Sequence[str]) -> list[str]:
    return [secrets] if isinstance(secrets, str) else list(secrets)


def _mac(secret: str, body: bytes, t: int) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def signature(secrets: str | Sequence[str], body: bytes, t: int) -> str:
    """The header's value: one v1 per secret (newest first), all over ``<t>.<body>``."""
    return ",".join([f"t={t}", *(f"v1={_mac(key, body, t)}" for key in _keys(secrets))])


def verify(secrets: str | Sequence[str], header: str, body: bytes, now: float,
           tolerance_s: float = TOLERANCE_S) -> None:
    """What a receiver does with a request, knowing one secret or several (while it rotates its
    own): passes when any v1 of ``header`` is the HMAC under any of ``secrets``; raises ValueError
    saying what is wrong. Schemes other than v1 are ignored, as new ones may be added."""
    t, given = None, []
    for part in header.split(","):
        key, eq, value = part.partition("=")
        if not eq or (key == "t" and t is not None):
            raise ValueError(f"malformed {SIGNATURE_HEADER} header")
        if key == "t":
            t = value
        elif key == "v1":
            given.append(value.encode("utf-8", "replace"))  # bytes: compare_digest refuses non-ASCII str
    if t is None or not _TIMESTAMP.fullmatch(t) or not given:
        raise ValueError(f"malformed {SIGNATURE_HEADER} header")
    if len(given) > MAX_SIGNATURES:
        raise ValueError(f"{len(given)} v1 signatures in the {SIGNATURE_HEADER} header; at most {MAX_SIGNATURES}")
    if abs(now - int(t)) > tolerance_s:
        raise ValueError("the signature's timestamp is outside the tolerance")
    keys = _keys(secrets)
    if not keys or not all(keys):
        raise ValueError("no secret to check the signature with")
    expected = [_mac(key, body, int(t)).encode() for key in keys]
    # every pair compared, none skipped on a match: the time taken says nothing of which one matched
    matched = [hmac.compare_digest(e, g) for e in expected for g in given]
    if not any(matched):
        raise ValueError("the signature does not match the body")
