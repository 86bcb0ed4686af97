"""The transaction context a device signs (mfa.proto, ``WebAuthnAssertion``): the UTF-8 of a JSON
object, keys sorted, no whitespace, non-ASCII characters as themselves::

    {"action":"payment","amount":{"cur":"CNY","minor":490000},"evidence":["<sha256 hex>",...],
     "nonce":"<session nonce>","payee":{"account":"**** 1234","name":"Li Lei"},
     "sid":"<session id>","tenant":"<tenant id>","v":1}

The client's side of the protocol, kept apart from the server's implementation (the SDK imports
no service code); tests/clients check that both build the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ._api.v1 import mfa_pb2

VERSION = 1


def payload_digest(data: bytes) -> str:
    """Lower-case hex SHA-256 of one payload (an encoded image or frame, an audio recording)."""
    return hashlib.sha256(data).hexdigest()


def transaction_context(*, session_id: str, nonce: str, tenant: str, action: str,
                        amount: tuple[str, int] | None = None, payee: dict[str, str] | None = None,
                        evidence: Sequence[str] = ()) -> bytes:
    """The bytes to sign. ``amount``: (ISO 4217 currency, minor units); ``payee``: {"name",
    "account"} as the user was shown them; ``evidence``: :func:`payload_digest` of each payload
    in the order sent (empty for a device proof)."""
    value: dict[str, Any] = {
        "v": VERSION, "sid": session_id, "nonce": nonce, "tenant": tenant, "action": action,
        "amount": {"cur": amount[0], "minor": int(amount[1])} if amount else None,
        "payee": {"account": payee["account"], "name": payee["name"]} if payee else None,
        "evidence": list(evidence)}
    return _canonical(value)


def push_fetch_context(session_id: str, confirmation_id: str, device_id: str) -> bytes:
    """The bytes an app signs to read a push confirmation (mfa.proto, ``GetPushConfirmationRequest``):
    the push's ``sid`` and ``cid`` and the app's own bound ``device_id``."""
    return _canonical({"v": VERSION, "type": "push-fetch", "cid": confirmation_id, "sid": session_id,
                       "device": device_id})


def push_answer_context(fields: Mapping[str, Any], answer: str, number: str) -> bytes:
    """The bytes an app signs to answer a push confirmation (mfa.proto, ``PushAnswer``): the
    ``fields`` GetPushConfirmation returned (parsed), ``answer`` ("approve" or "deny") and the
    ``number`` the user typed from the bank's screen."""
    if answer not in ("approve", "deny"):
        raise ValueError("answer must be approve or deny")
    return _canonical({**fields, "answer": answer, "number": number})


def _canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def webauthn_challenge(context: bytes) -> bytes:
    """The challenge of a WebAuthn assertion binding ``context``: its SHA-256."""
    return hashlib.sha256(context).digest()


def shown(request: mfa_pb2.StartAuthenticationRequest, response: mfa_pb2.StartAuthenticationResponse) -> dict:
    """The fields of a session's transaction context (keyword arguments of
    :func:`transaction_context` but ``evidence``), from its start request and response."""
    return dict(session_id=response.session_id, nonce=response.nonce, tenant=request.subject.tenant_id,
                action=request.action,
                amount=(request.amount.currency, request.amount.amount_minor) if request.HasField("amount") else None,
                payee={"account": request.payee.account_masked, "name": request.payee.name}
                if request.HasField("payee") else None)
