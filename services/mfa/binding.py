"""The transaction context: the bytes a device signs to bind a capture, or a device proof, to one
authentication session, to what the user was shown (action, amount, payee: what you see is what
you sign) and to the exact payloads it sends (the SHA-256 of every image, frame and recording).

This module is the one definition of those bytes, for the MFA and for clients alike (tests, a
client SDK): ``transaction_context(...)``, ``payload_digest(bytes)``, ``evidence_digests(evidence)``,
``webauthn_challenge(context)``. Version 1 is the UTF-8 of a JSON object with sorted keys, no
whitespace and non-ASCII characters written as themselves::

    {"action":"payment","amount":{"cur":"CNY","minor":490000},"evidence":["<sha256 hex>",...],
     "nonce":"<session nonce>","payee":{"account":"**** 1234","name":"Li Lei"},
     "sid":"<session id>","tenant":"<tenant id>","v":1}

``amount`` and ``payee`` are null when the session has none; ``evidence`` is empty for a device
proof. The MFA parses a context a client sends (:func:`parse_context`) only to name what differs;
it always compares every field with the session and the payloads it received, and verifies the
signature over the exact bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VERSION = 1
MAX_CONTEXT_BYTES = 8192
_KEYS = frozenset({"v", "sid", "nonce", "tenant", "action", "amount", "payee", "evidence"})


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def payload_digest(data: bytes) -> str:
    """Lower-case hex SHA-256 of one payload (an encoded image or frame, an audio recording)."""
    return hashlib.sha256(data).hexdigest()


def evidence_digests(evidence: Any) -> list[str]:
    """The digests of a FaceEvidence (its image, or each frame in order) or a VoiceEvidence (its
    audio), in the order the context lists them."""
    if hasattr(evidence, "frames") and len(evidence.frames):
        return [payload_digest(f.image.data) for f in evidence.frames]
    if hasattr(evidence, "image"):
        return [payload_digest(evidence.image.data)]
    if hasattr(evidence, "audio"):
        return [payload_digest(evidence.audio.data)]
    return []


def payee_object(name: str, account_masked: str) -> dict[str, str]:
    return {"account": account_masked, "name": name}


def transaction_context(*, session_id: str, nonce: str, tenant: str, action: str,
                        amount: tuple[str, int] | None = None, payee: dict[str, str] | None = None,
                        evidence: Sequence[str] = ()) -> bytes:
    """The bytes a device signs (see the module docstring). ``amount``: (ISO 4217 currency, minor
    units); ``payee``: :func:`payee_object` of what the user was shown."""
    return canonical_json({
        "v": VERSION, "sid": session_id, "nonce": nonce, "tenant": tenant, "action": action,
        "amount": {"cur": amount[0], "minor": int(amount[1])} if amount else None,
        "payee": dict(payee) if payee else None, "evidence": list(evidence)})


def webauthn_challenge(context: bytes) -> bytes:
    """The challenge of a WebAuthn assertion over ``context`` (clientDataJSON carries its base64url)."""
    return hashlib.sha256(context).digest()


def registration_challenge(session_id: str, nonce: str, tenant: str) -> bytes:
    """The challenge of the WebAuthn registration a strong session allows (StartDeviceRegistration)."""
    return hashlib.sha256(canonical_json({"v": VERSION, "purpose": "register", "sid": session_id,
                                          "nonce": nonce, "tenant": tenant})).digest()


class ContextError(ValueError):
    """A context that is not a version-1 transaction context in canonical form."""


@dataclass(frozen=True)
class Context:
    session_id: str
    nonce: str
    tenant: str
    action: str
    amount: tuple[str, int] | None
    payee: dict[str, str] | None
    evidence: tuple[str, ...]


def load_object(data: bytes, keys: frozenset[str], error: type[ValueError]) -> dict[str, Any]:
    """The JSON object ``data`` holds, with exactly ``keys``; raises ``error`` otherwise."""
    if len(data) > MAX_CONTEXT_BYTES:
        raise error(f"longer than {MAX_CONTEXT_BYTES} bytes")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise error("not UTF-8 JSON") from None
    if not isinstance(obj, dict) or set(obj) != keys:
        raise error(f"must be an object with exactly the keys {', '.join(sorted(keys))}")
    return obj


def parse_context(data: bytes) -> Context:
    """A context a client sent; raises ContextError unless it is canonical version-1 JSON (the same
    bytes :func:`transaction_context` would build from its fields)."""
    obj = load_object(data, _KEYS, ContextError)
    if obj["v"] != VERSION:
        raise ContextError(f"version {obj['v']!r}; this service reads version {VERSION}")
    amount, payee, evidence = obj["amount"], obj["payee"], obj["evidence"]
    try:
        ctx = Context(
            str(obj["sid"]), str(obj["nonce"]), str(obj["tenant"]), str(obj["action"]),
            None if amount is None else (str(amount["cur"]), int(amount["minor"])),
            None if payee is None else {"account": str(payee["account"]), "name": str(payee["name"])},
            tuple(str(e) for e in evidence))
    except (KeyError, TypeError, ValueError):
        raise ContextError("a field has the wrong shape") from None
    rebuilt = transaction_context(session_id=ctx.session_id, nonce=ctx.nonce, tenant=ctx.tenant, action=ctx.action,
                                  amount=ctx.amount, payee=ctx.payee, evidence=ctx.evidence)
    if rebuilt != data:
        raise ContextError("not in canonical form (sorted keys, no whitespace, UTF-8 without escapes)")
    return ctx
