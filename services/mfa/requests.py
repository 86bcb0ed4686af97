"""Checks of the orchestrator's request fields: every bad value is INVALID_ARGUMENT naming the
field, raised before anything is stored."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection
from dataclasses import dataclass

from babel.numbers import is_currency

from services.common import errors, validation
from services.common.api.v1 import mfa_pb2
from services.common.privacy import is_personal_data

from .risk import MAX_CONVERSATION_CHARS, Place

# whole values (fullmatch): "$" also matches before a final "\n"
_ACTION = re.compile(r"[a-z][a-z0-9_]{0,63}")
_COUNTRY = re.compile(r"[A-Z]{2}")
MAX_AMOUNT_MINOR = 10 ** 15
MAX_LABEL = 64
MAX_PAYEE_NAME = 128
_DIGIT_RUN = re.compile(r"\d{7,}")


@dataclass(frozen=True)
class Context:
    place: Place | None
    conversation_text: str


def channel(value: int) -> str:
    if value == mfa_pb2.CHANNEL_UNSPECIFIED or value not in mfa_pb2.Channel.values():
        raise errors.invalid_argument("channel must be app, kiosk, ivr or web", channel="unspecified or unknown")
    return mfa_pb2.Channel.Name(value).removeprefix("CHANNEL_").lower()


def action(value: str, known: list[str]) -> str:
    if not _ACTION.fullmatch(value or ""):
        raise errors.invalid_argument("action must be lower_snake_case, e.g. login or payment", action="malformed")
    if value not in known:
        raise errors.invalid_argument(f"action {value!r} is not in the policy; known: {', '.join(sorted(known))}",
                                      reason="UNKNOWN_ACTION", action="not in the policy")
    return value


def amount(request: mfa_pb2.StartAuthenticationRequest, bands: Collection[str]) -> tuple[str, int] | None:
    """``bands``: the currencies the action's amount bands name ("*": every other one); an action
    with bands needs an amount, in a currency they cover: one past them all would be waved through
    on the action's base requirement, however large."""
    if not request.HasField("amount"):
        if bands:
            raise errors.invalid_argument("this action needs an amount", amount="required")
        return None
    m = request.amount
    # a code CLDR knows, not merely three letters: the policy's amount bands are per currency, and one
    # they do not name (e.g. "CNY\n") would fall past the bands of the currency it is taken for
    if not is_currency(m.currency):
        raise errors.invalid_argument("amount.currency must be an ISO 4217 code, e.g. CNY",
                                      amount__currency="not ISO 4217")
    if bands and m.currency not in bands and "*" not in bands:
        raise errors.invalid_argument(
            f"the policy's amount bands for this action cover {', '.join(sorted(bands))}, not {m.currency}: "
            "pay in one of those, or have the policy name this currency or a '*' band",
            reason="CURRENCY_NOT_IN_POLICY", amount__currency="not in the action's amount bands")
    if not 0 <= m.amount_minor <= MAX_AMOUNT_MINOR:
        raise errors.invalid_argument("amount.amount_minor out of range", amount__amount_minor="negative or too large")
    return m.currency, m.amount_minor


def payee(request: mfa_pb2.StartAuthenticationRequest | mfa_pb2.SendPushConfirmationRequest | mfa_pb2.SendOtpRequest,
          needs: bool) -> tuple[str, str] | None:
    """(name, masked account) as the user is shown them; personal numbers are refused."""
    if not request.HasField("payee"):
        if needs:
            raise errors.invalid_argument("this action needs the payee the user is shown", payee="required")
        return None
    name, account = request.payee.name, request.payee.account_masked
    if not 1 <= len(name) <= MAX_PAYEE_NAME or not name.isprintable() or is_personal_data(name):
        raise errors.invalid_argument(f"payee.name: 1..{MAX_PAYEE_NAME} printable characters, no phone, ID or card numbers",
                                      payee__name="empty, too long or personal data")
    if (not 1 <= len(account) <= 64 or not account.isprintable() or account.count("*") < 4
            or _DIGIT_RUN.search(account) or is_personal_data(account)):
        raise errors.invalid_argument("payee.account_masked must be masked: at least four '*' and no run of more "
                                      "than 6 digits", payee__account_masked="not masked")
    return name, account


def context_signals(ctx: mfa_pb2.ContextSignals, now) -> Context:
    if len(ctx.conversation_text) > MAX_CONVERSATION_CHARS:
        raise errors.invalid_argument(f"context.conversation_text is longer than {MAX_CONVERSATION_CHARS} characters",
                                      context__conversation_text="too long")
    if ctx.ip_address:
        try:
            ipaddress.ip_address(ctx.ip_address)
        except ValueError:
            raise errors.invalid_argument("context.ip_address is not an IP address",
                                          context__ip_address="malformed") from None
    if ctx.country and not _COUNTRY.fullmatch(ctx.country):
        raise errors.invalid_argument("context.country must be ISO 3166-1 alpha-2", context__country="malformed")
    if len(ctx.region) > 64:
        raise errors.invalid_argument("context.region is too long", context__region="too long")
    lat, lon = ctx.latitude, ctx.longitude
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
        raise errors.invalid_argument("context latitude/longitude out of range", context__latitude="out of range")
    has_coords = (lat, lon) != (0.0, 0.0)
    place = None
    if ctx.country or has_coords:
        place = Place(ctx.country, lat if has_coords else None, lon if has_coords else None, now)
    return Context(place, ctx.conversation_text)


def label(value: str, field: str) -> str:
    """Free text kept in storage or audit: short, and no phone, ID or card numbers."""
    return validation.label(value, field, MAX_LABEL)
