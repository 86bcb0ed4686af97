"""Personal-data helpers: keyed pseudonyms, phone masking, free-text redaction, and the one rule of
what may not stand in an id, a label or an audit record (:func:`is_personal_data`).

``redact`` runs on every log line (the JSON log formatter) and on every audit ``details`` value,
so its patterns are compiled once and each is anchored on something rare (``@``, ``+``, a digit
run of a given length) to keep the common case — a line with no personal data — cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime, timezone

__all__ = [
    "Pseudonymizer",
    "mask_phone",
    "redact",
    "looks_like_personal_number",
    "is_personal_data",
    "is_valid_cn_resident_id",
    "luhn_valid",
]


class Pseudonymizer:
    """Keyed, stable pseudonyms for subject ids: HMAC-SHA256 over (tenant, subject).

    The key must never change once pseudonyms have been written (audit records link a subject's
    events through them), which is why the keyring keeps it apart from the rotating
    key-encryption keys.
    """

    _DOMAIN = b"biogate-pseudonym-v1"

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 128 bits")
        self._key = bytes(key)

    def pseudonymize(self, tenant_id: str, subject_id: str) -> str:
        msg = bytearray(self._DOMAIN)
        for part in (tenant_id, subject_id):
            raw = part.encode("utf-8")
            msg += len(raw).to_bytes(4, "big") + raw  # length-prefixed: no ambiguous joins
        return "ps1_" + hmac.new(self._key, bytes(msg), hashlib.sha256).hexdigest()[:32]

    __call__ = pseudonymize

    def __repr__(self) -> str:  # never print the key
        return "Pseudonymizer(<key>)"


# --- phone masking ---------------------------------------------------------------------------

# ITU-T E.164 country calling codes: 1 and 7 are one digit, these are two digits, all others
# three. That is enough to split "+<cc><national number>" without a numbering-plan database.
_CC2 = frozenset(
    "20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 "
    "60 61 62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98".split()
)
_E164 = re.compile(r"\+[1-9]\d{6,14}")


def _split_country_code(digits: str) -> tuple[str, str]:
    if digits[0] in "17":
        return digits[:1], digits[1:]
    if digits[:2] in _CC2:
        return digits[:2], digits[2:]
    return digits[:3], digits[3:]


def mask_phone(e164: str) -> str:
    """``+8613800135678`` -> ``+86 *** **** 5678``: the country code and last four digits only."""
    compact = re.sub(r"[\s\-().]", "", e164)
    if not _E164.fullmatch(compact):
        raise ValueError("not an E.164 phone number")
    cc, national = _split_country_code(compact[1:])
    hidden = len(national) - 4
    if hidden == 7:  # Chinese mobile and other 3-4-4 plans
        masked = "*** ****"
    elif hidden == 6:  # North American 3-3-4
        masked = "*** ***"
    else:
        masked = "*" * max(hidden, 1)
    return f"+{cc} {masked} {national[-4:]}"


# --- identity numbers ------------------------------------------------------------------------

_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_ID_CHECK = "10X98765432"
_CN_ID_SHAPE = re.compile(r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]")


def is_valid_cn_resident_id(s: str) -> bool:
    """An 18-character PRC resident identity number with a valid birth date and check character."""
    if not _CN_ID_SHAPE.fullmatch(s):
        return False
    try:
        datetime.strptime(s[6:14], "%Y%m%d")
    except ValueError:
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _CN_ID_WEIGHTS, strict=True))
    return _CN_ID_CHECK[total % 11] == s[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# --- redaction -------------------------------------------------------------------------------

# Not next to an ASCII letter, digit or underscore (Chinese text around a number is a boundary:
# "手机13800138000"), nor inside a dashed/dotted token such as a UUID, a version or a decimal.
_L = r"(?<![A-Za-z0-9_.\-])"
_R = r"(?![A-Za-z0-9_\-]|\.\d)"

_EMAIL_IN_TEXT = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
# One pass for everything numeric; at each position the first alternative that matches wins.
# The leading lookahead makes the scan skip every position that cannot start a number.
_NUMBERS = re.compile(
    r"(?=[+0-9])(?:"
    rf"(?P<id>{_L}{_CN_ID_SHAPE.pattern}{_R})"
    # E.164, also written with single spaces/dashes between groups: "+44 20 7946 0958".
    r"|(?P<phone>(?<![A-Za-z0-9_+])\+[1-9](?:[ \-]?\d){6,14}(?!\d))"
    # Chinese mobiles, optionally with 86/0086 in front and 3-4-4 grouping.
    rf"|(?P<mobile>{_L}(?:(?:00)?86[ \-]?)?1[3-9]\d(?:[ \-]?\d{{4}}){{2}}{_R})"
    # International numbers dialled with 00 instead of "+": "0044 20 7946 0958".
    rf"|(?P<intl>{_L}00[1-9](?:[ \-]?\d){{6,14}}{_R})"
    # Card numbers written in groups of four.
    rf"|(?P<card>{_L}\d{{4}}(?:[ \-]\d{{4}}){{2,3}}(?:[ \-]\d{{1,3}})?{_R})"
    rf"|(?P<long>{_L}\d{{12,}}{_R})"
    r")"
)
_TAGS = {"id": "[id-number]", "phone": "[phone]", "mobile": "[phone]", "intl": "[phone]", "card": "[number]"}

_EPOCH_LO = datetime(2000, 1, 1, tzinfo=timezone.utc).timestamp()
_EPOCH_HI = datetime(2100, 1, 1, tzinfo=timezone.utc).timestamp()


def _looks_like_timestamp(digits: str) -> bool:
    # Epoch seconds in milli-, micro- or nanoseconds, or a compact YYYYMMDDhhmmss[fraction].
    scale = {13: 1e3, 16: 1e6, 19: 1e9}.get(len(digits))
    if scale and _EPOCH_LO <= int(digits) / scale < _EPOCH_HI:
        return True
    if 14 <= len(digits) <= 20 and digits[:2] in ("19", "20"):
        try:
            datetime.strptime(digits[:14], "%Y%m%d%H%M%S")
            return True
        except ValueError:
            pass
    return False


def _mask_number(m: re.Match[str]) -> str:
    kind = m.lastgroup
    if kind is not None and kind != "long":
        return _TAGS[kind]
    digits = m.group(0)
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return "[number]"  # a card number wins over a look-alike timestamp
    return digits if _looks_like_timestamp(digits) else "[number]"


def redact(text: str) -> str:
    """Mask e-mail addresses, PRC resident ID numbers, phone numbers (E.164, 00-prefixed and Chinese
    mobiles) and long digit runs (card/account numbers) in free text.

    Timestamps (epoch ms/us/ns, compact date-times), UUIDs, versions and short ids pass through.
    """
    if not text:
        return text
    if "@" in text:
        text = _EMAIL_IN_TEXT.sub("[email]", text)
    return _NUMBERS.sub(_mask_number, text)


_SEPARATORS = re.compile(r"[\s\-().]")
_CN_MOBILE = re.compile(r"(?:\+86|0086|86)?1[3-9]\d{9}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")


def looks_like_personal_number(s: str) -> bool:
    """True for a phone number, PRC resident ID number, card number or e-mail address.

    Used to refuse subject ids that are really personal identifiers. Plain customer numbers
    (digit strings that are none of these) are accepted.
    """
    s = s.strip()
    if _EMAIL.fullmatch(s):
        return True
    compact = _SEPARATORS.sub("", s)
    if _CN_MOBILE.fullmatch(compact) or _E164.fullmatch(compact):
        return True
    if compact.startswith("00") and compact.isdigit() and 9 <= len(compact) <= 17:
        return True  # international dialling prefix instead of "+"
    if is_valid_cn_resident_id(compact):
        return True
    return compact.isdigit() and 13 <= len(compact) <= 19 and luhn_valid(compact)


def is_personal_data(text: str) -> bool:
    """The one rule for ids, labels and audit records: True when ``text`` holds a phone number, a
    PRC resident ID, card or account number (a run of 12 or more digits) or an e-mail address,
    either inside it (what :func:`redact` would mask) or as the whole value
    (:func:`looks_like_personal_number`, which also sees separators and a ``00`` dialling prefix).

    Request validation (services/common/validation.py) refuses such ids and labels up front with
    INVALID_ARGUMENT, and the audit guard refuses such records, with this same function: a value
    the validation let through can never make the audit refuse a write that already happened.
    """
    return bool(text) and (redact(text) != text or looks_like_personal_number(text))
