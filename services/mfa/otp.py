"""SMS OTP as a NIST SP 800-63B-4 restricted authenticator.

Codes are at least 6 random digits from :mod:`secrets`, valid at most 10 minutes, single use, with
a bounded number of attempts. They are stored only as an HMAC keyed with a server key (a leaked
table does not give the codes: 10^6 candidates are nothing to a plain hash). A new code replaces
the session's previous one. Sending is limited by a resend cool-down per session and by fixed
windows per phone number within the tenant (keyed hash of tenant and number: each bank's policy
limits its own sends, and one bank cannot spend another's budget for a number) and per subject (the caller enforces the
per-session resend cool-down on the session's own record, which is exact, unlike a window). The phone number is
decrypted only to hand the message to the gateway.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from babel.numbers import format_currency, get_currency_precision

from services.common import errors
from services.common.privacy import mask_phone
from services.common.runtime import Runtime

from .keys import derive, keyed_hash
from .policy.schema import OtpFactor
from .sms import SmsError, SmsGateway
from .storage import MfaStore, OtpRecord


@dataclass(frozen=True)
class Sent:
    masked_phone: str
    expires_at: datetime
    resend_after: datetime


@dataclass(frozen=True)
class Checked:
    passed: bool
    attempts_left: int
    reason: str  # OTP_OK, OTP_WRONG, OTP_EXPIRED_OR_USED


def new_code(digits: int) -> str:
    return f"{secrets.randbelow(10 ** digits):0{digits}d}"


class OtpService:
    def __init__(self, rt: Runtime, store: MfaStore, gateway: SmsGateway) -> None:
        self.rt = rt
        self.store = store
        self.gateway = gateway
        master = rt.keyring.pseudonym_key()
        self._code_key = derive(master, "otp-code")
        self._phone_key = derive(master, "otp-phone-rate")

    def code_hash(self, session_id: str, code: str) -> str:
        return keyed_hash(self._code_key, session_id, code)

    def _phone_rate_key(self, tenant: str, phone: str) -> str:
        return f"mfa:otp:phone:{keyed_hash(self._phone_key, tenant, phone)}"

    def _subject_rate_key(self, tenant: str, subject: str) -> str:
        return f"mfa:otp:subject:{self.rt.pseudonymize(tenant, subject)}"

    def rate_limit_keys(self, tenant: str, subject: str) -> list[str]:
        """The counters kept for the subject and its phone number (what an erasure removes)."""
        keys = [self._subject_rate_key(tenant, subject)]
        stored = self.rt.storage.subjects.get_phone(tenant, subject)
        if stored is not None:
            keys.append(self._phone_rate_key(tenant, self.rt.crypto.decrypt_contact(tenant, subject, stored[0])))
        return keys

    def send(self, cfg: OtpFactor, tenant: str, subject: str, session_id: str, now: datetime,
             purpose: str = "") -> Sent:
        """``purpose``: what the code authorises, in the text after the code (:func:`purpose`)."""
        stored = self.rt.storage.subjects.get_phone(tenant, subject)
        if stored is None:
            raise errors.failed_precondition("no phone number is registered for this subject", "NO_PHONE")
        phone = self.rt.crypto.decrypt_contact(tenant, subject, stored[0])
        rl = self.rt.storage.rate_limits
        for key, window, what in (
            (self._phone_rate_key(tenant, phone), cfg.per_phone, "this phone number"),
            (self._subject_rate_key(tenant, subject), cfg.per_subject, "this subject"),
        ):
            ok, _ = rl.hit(key, window.window_s, window.limit, now)
            if not ok:
                raise errors.resource_exhausted(
                    f"too many OTPs for {what}: at most {window.limit} per {window.window_s} s", "OTP_RATE_LIMITED")
        previous = self.store.otp.get_active_for_session(session_id, now)
        if previous is not None:
            self.store.otp.consume(previous.id, now)  # superseded: only the newest code works
        code = new_code(cfg.digits)
        expires = now + timedelta(seconds=cfg.ttl_s)
        rec = self.store.otp.create(OtpRecord(session_id, tenant, subject, self.code_hash(session_id, code),
                                                   expires, cfg.max_attempts, sent_at=now))
        minutes = max(1, cfg.ttl_s // 60)
        text = (f"{code} is your {f'code for {purpose}' if purpose else 'verification code'}. Valid {minutes} min. "
                "Never share it, not even with bank staff.")
        try:
            self.gateway.send(phone, text, idempotency_key=rec.id)
        except SmsError as exc:
            self.store.otp.consume(rec.id, now)  # never delivered: nobody may use it
            raise errors.unavailable(f"the SMS could not be sent: {exc}", "SMS_GATEWAY_FAILED") from None
        return Sent(mask_phone(phone), expires, now + timedelta(seconds=cfg.resend_cooldown_s))

    def check(self, session_id: str, code: str, now: datetime) -> Checked:
        # Only the newest code answers: an older one that a concurrent send left unconsumed must
        # not become usable once the newest is used up.
        newest = self.store.otp.newest_for_session(session_id)
        if newest is None:
            return Checked(False, 0, "OTP_EXPIRED_OR_USED")
        spent = self.store.otp.record_attempt(newest.id, now)
        if spent is None:  # used, expired, out of attempts, or raced with another attempt for the last one
            return Checked(False, 0, "OTP_EXPIRED_OR_USED")
        left = spent.max_attempts - spent.attempts
        if hmac.compare_digest(spent.code_hash, self.code_hash(session_id, code)):
            if self.store.otp.consume(spent.id, now):
                self.store.otp.void_session(session_id, now)  # a session's SMS code passes once
                return Checked(True, left, "OTP_OK")
            return Checked(False, left, "OTP_EXPIRED_OR_USED")
        return Checked(False, left, "OTP_WRONG")


def purpose(action: str, amount: tuple[str, int] | None, payee: dict[str, str] | None) -> str:
    """The SMS's words for what its code authorises (PSD2 RTS art. 5: the payer is made aware of
    the amount and the payee): "" for an action without an amount, else e.g. "payment of
    CNY 4,900.00 to J. Smith (****1234)", the amount in its currency's minor units (CLDR)."""
    if amount is None:
        return ""
    currency, minor = amount
    value = Decimal(minor).scaleb(-get_currency_precision(currency))
    text = f"{action.replace('_', ' ')} of {format_currency(value, currency, format='¤¤ #,##0.00', currency_digits=True, locale='en')}"
    return text + (f" to {payee['name']} ({payee['account']})" if payee else "")
