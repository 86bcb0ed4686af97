"""Keeps personal and biometric data out of audit records.

An audit record is kept for years and exported to auditors, so its ``details`` may carry only
decisions, scores, reasons, ids of models and requests. Refused, with :class:`AuditDataError`:

* keys that name personal or biometric data (phone, id_number, email, embedding, image, ...);
* strings (and integers) that :func:`~services.common.privacy.is_personal_data` finds personal:
  phone, ID, card/account numbers, e-mail addresses (the rule request validation applies too);
* binary values, and numeric arrays longer than :data:`MAX_NUMERIC_ARRAY` (an embedding or a
  waveform, whatever its key is called);
* strings longer than :data:`MAX_STRING` (an encoded image), non-JSON values, NaN/infinity.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

from services.common.privacy import is_personal_data

from .chain import canonical_json

MAX_NUMERIC_ARRAY = 8
MAX_STRING = 1024
MAX_DEPTH = 8

# Compared against keys lower-cased with everything but letters and digits removed: the whole
# key, its ending ("face_image", "new_phone") or anywhere in it ("probe_embedding_v2").
_FORBIDDEN_KEYS = frozenset(
    "msisdn ssn pin otp otpcode password secret token template vector vectors tel telephone "
    "face voice idno idnum contact contactnumber address".split()
)
_FORBIDDEN_ENDINGS = (
    "phone", "phonenumber", "phoneno", "mobile", "mobilenumber", "mobileno", "e164",
    "image", "images", "photo", "picture", "selfie", "audio", "recording", "waveform",
    "pcm", "wav", "jpeg", "jpg", "png", "b64", "base64",
)  # fmt: skip
_FORBIDDEN_PARTS = (
    "email", "nationalid", "residentid", "identitynumber", "idnumber", "idcard", "passport",
    "cardnumber", "cardno", "accountnumber", "accountno", "iban", "homeaddress", "postaladdress",
    "birth", "embedding", "voiceprint", "faceprint", "plaintext", "fullname", "realname",
    "firstname", "lastname", "surname", "customername",
)  # fmt: skip
_KEY_CHARS = re.compile(r"[^a-z0-9]")
# Our own key ids, allowed as such under "key_id"/"kid" only: a public key's fingerprint
# (signing.key_id, jwt_kid), a KEK id (keyring.new_key_id) or a random hex id. Their 16 hex digits
# are all decimal about once in 1,500 ids and then read as a card number, which refused the key's
# own audit record (and a service's first start with it).
_KEY_ID_FIELDS = frozenset({"keyid", "kid"})
_KEY_ID = re.compile(r"(?:ed25519:|p256:)?[0-9a-f]{16}|k\d{8}T\d{12}-[0-9a-f]{6}|mfa-[A-Za-z0-9_-]{16}")


class AuditDataError(ValueError):
    """The audit event would carry personal or biometric data; it was not written."""


def check_text(what: str, value: str | None) -> None:
    if value is not None and is_personal_data(value):
        raise AuditDataError(f"{what} looks like personal data (phone, ID, card number or e-mail)")


def check_details(details: Mapping[str, Any] | None) -> str:
    """The canonical JSON of ``details``, or AuditDataError."""
    details = dict(details or {})
    _check(details, "details", 0)
    try:
        return canonical_json(details)
    except (TypeError, ValueError) as exc:
        raise AuditDataError(f"details are not plain JSON: {exc}") from None


def _check(value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise AuditDataError(f"{path}: nested too deeply")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        check_text(path, str(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise AuditDataError(f"{path}: NaN or infinity")
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise AuditDataError(f"{path}: string of {len(value)} characters (encoded data?)")
        check_text(path, value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raise AuditDataError(f"{path}: binary data")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise AuditDataError(f"{path}: non-string key {k!r}")
            _check_key(k, path)
            if not (isinstance(v, str) and _KEY_CHARS.sub("", k.lower()) in _KEY_ID_FIELDS and _KEY_ID.fullmatch(v)):
                _check(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        numbers = sum(1 for v in value if isinstance(v, (int, float)) and not isinstance(v, bool))
        if numbers > MAX_NUMERIC_ARRAY:
            raise AuditDataError(f"{path}: numeric array of {numbers} values (biometric data?)")
        for i, v in enumerate(value):
            _check(v, f"{path}[{i}]", depth + 1)
    else:
        raise AuditDataError(f"{path}: {type(value).__name__} is not plain JSON")


@functools.lru_cache(maxsize=1024)  # the keys are the code's own, a few dozen; a refused one is not kept
def _check_key(key: str, path: str) -> None:
    norm = _KEY_CHARS.sub("", key.lower())
    if norm.startswith("masked"):
        pass  # "masked_phone": a masked value is allowed; the value itself is still checked
    elif (
        norm in _FORBIDDEN_KEYS
        or norm.endswith(_FORBIDDEN_ENDINGS)
        or any(part in norm for part in _FORBIDDEN_PARTS)
    ):
        raise AuditDataError(f"{path}: key {key!r} names personal or biometric data")
    check_text(f"{path} key", key)
