"""The push confirmation: what the app shows and signs. One definition of the bytes for the MFA
and for clients (tests, an app SDK).

Version 1 is the UTF-8 of a JSON object with sorted keys, no whitespace and non-ASCII characters as
themselves (services/mfa/binding.canonical_json)::

    {"action":"payment","amount":{"cur":"CNY","minor":490000},"answer":"approve","cid":"pc_...",
     "exp":"2026-12-05T03:45:16+00:00","nonce":"<session nonce>","number":"42",
     "payee":{"account":"6222 **** 1234","name":"Li Lei"},
     "shown":{"channel":"web","country":"FR","device":"new"},"sid":"ses_...","tenant":"bank-a",
     "type":"push","v":1}

``shown`` are the facts the customer judges by: the channel the transaction started on, the
country it came from (null when unknown) and whether the device that started it is one of theirs
("bound", "drifted", "new", "unbound", "absent"). The number is on the bank's screen only, and the
user types it.

The push message (FCM, APNs: a third party's servers and logs) carries none of these fields, only
opaque ids and a wake-up alert (:meth:`Confirmation.push_data`). The app reads the fields from the
MFA with GetPushConfirmation, signing the fetch context with its bound key::

    {"cid":"pc_...","device":"dev_...","sid":"ses_...","type":"push-fetch","v":1}

(:func:`fetch_context`); the MFA keeps the fields sealed in the session until they are answered
(services/mfa/push/flow.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..binding import canonical_json, load_object

VERSION = 1
ANSWERS = ("approve", "deny")
_KEYS = frozenset({"v", "type", "cid", "sid", "nonce", "tenant", "action", "amount", "payee", "shown", "exp",
                   "answer", "number"})


@dataclass(frozen=True)
class Shown:
    """What a confirmation shows, besides the session's action, amount and payee."""

    channel: str
    country: str | None
    device: str

    def to_json(self) -> dict[str, Any]:
        return {"channel": self.channel, "country": self.country, "device": self.device}


@dataclass(frozen=True)
class Confirmation:
    confirmation_id: str
    session_id: str
    nonce: str
    tenant: str
    action: str
    amount: tuple[str, int] | None
    payee: dict[str, str] | None
    shown: Shown
    expires: str  # RFC 3339, as sent

    def fields(self) -> dict[str, Any]:
        return {"v": VERSION, "type": "push", "cid": self.confirmation_id, "sid": self.session_id,
                "nonce": self.nonce, "tenant": self.tenant, "action": self.action,
                "amount": {"cur": self.amount[0], "minor": int(self.amount[1])} if self.amount else None,
                "payee": dict(self.payee) if self.payee else None, "shown": self.shown.to_json(), "exp": self.expires}

    def context(self, answer: str, number: str) -> bytes:
        """The bytes the app signs for ``answer`` ("approve" or "deny") with the ``number`` the user entered."""
        return canonical_json({**self.fields(), "answer": answer, "number": number})

    def push_data(self, request_id: str) -> dict[str, str]:
        """The push message's data (string values only): opaque ids, none of the shown fields (they
        would reach the push provider in clear) and never the number."""
        data = {"type": "biogate.confirm", "cid": self.confirmation_id, "sid": self.session_id}
        if request_id:
            data["request_id"] = request_id
        return data


@dataclass(frozen=True)
class SealedFields:
    """The envelope binding of a confirmation's fields kept in its session (every field is
    associated data: an envelope copied to another confirmation does not open)."""

    tenant_id: str
    subject_id: str
    confirmation_id: str

    def fields(self) -> dict[str, str]:
        return {"purpose": "push-confirmation", "tenant": self.tenant_id, "subject": self.subject_id,
                "confirmation": self.confirmation_id}


def fetch_context(session_id: str, confirmation_id: str, device_id: str) -> bytes:
    """The bytes a bound device signs to read a confirmation (GetPushConfirmation)."""
    return canonical_json({"v": VERSION, "type": "push-fetch", "cid": confirmation_id, "sid": session_id,
                           "device": device_id})


@dataclass(frozen=True)
class Answer:
    confirmation: Confirmation
    answer: str
    number: str


class ConfirmationError(ValueError):
    """Bytes that are not a version-1 push confirmation in canonical form."""


def parse_answer(data: bytes) -> Answer:
    obj = load_object(data, _KEYS, ConfirmationError)
    if obj["v"] != VERSION or obj["type"] != "push":
        raise ConfirmationError(f"must be type push, version {VERSION}")
    if obj["answer"] not in ANSWERS:
        raise ConfirmationError("answer must be approve or deny")
    amount, payee, shown = obj["amount"], obj["payee"], obj["shown"]
    try:
        conf = Confirmation(
            str(obj["cid"]), str(obj["sid"]), str(obj["nonce"]), str(obj["tenant"]), str(obj["action"]),
            None if amount is None else (str(amount["cur"]), int(amount["minor"])),
            None if payee is None else {"account": str(payee["account"]), "name": str(payee["name"])},
            Shown(str(shown["channel"]), None if shown["country"] is None else str(shown["country"]),
                  str(shown["device"])),
            str(obj["exp"]))
        answer = Answer(conf, obj["answer"], str(obj["number"]))
    except (KeyError, TypeError, ValueError):
        raise ConfirmationError("a field has the wrong shape") from None
    if conf.context(answer.answer, answer.number) != data:
        raise ConfirmationError("not in canonical form (sorted keys, no whitespace, UTF-8 without escapes)")
    return answer
