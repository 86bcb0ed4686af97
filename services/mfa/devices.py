"""Devices: a canonical fingerprint of what the app reports, tolerant of benign drift, and
proof of possession of a device-bound key (ECDSA P-256 or Ed25519 over the session nonce).

The fingerprint is a keyed hash of the hard attributes (platform and the app's install id, or
for browsers without one the model, screen and time zone), so the stored value cannot be turned
back into attributes. The soft attributes (model, OS and app versions, locale, time zone, screen)
are kept beside it and compared with weights: an OS update or a new app version leaves a bound
device recognised ("drifted"); a copied install id on another model does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.common import errors
from services.common.api.v1 import mfa_pb2
from services.common.privacy import is_personal_data

from .keys import keyed_hash
from .risk import DeviceState
from .storage import DeviceRecord

PLATFORMS = ("android", "ios", "web", "kiosk")
SOFT_WEIGHTS = {"model": 0.35, "os_major": 0.1, "os_version": 0.05, "app_major": 0.05,
                "locale": 0.15, "timezone": 0.15, "screen": 0.15}
MAX_FIELD = 128
MAX_PUBLIC_KEY = 1024


@dataclass(frozen=True)
class CanonicalDevice:
    platform: str
    fingerprint: str
    soft: dict[str, str]


def _clean(value: str, field: str) -> str:
    if len(value) > MAX_FIELD:
        raise errors.invalid_argument(f"device.{field} is longer than {MAX_FIELD} characters",
                                      **{f"device__{field}": "too long"})
    if is_personal_data(value):  # kept beside the fingerprint: the app's ids, never the customer's
        raise errors.invalid_argument(f"device.{field} looks like a phone, ID, card number or e-mail address",
                                      reason="PERSONAL_NUMBER_AS_ID", **{f"device__{field}": "looks like personal data"})
    return " ".join(value.split()).casefold()


def _major(version: str) -> str:
    m = re.match(r"\D*(\d+)", version)
    return m.group(1) if m else version


def is_absent(info: mfa_pb2.DeviceInfo) -> bool:
    return not info.platform and not info.install_id and not info.model


def canonical(info: mfa_pb2.DeviceInfo, key: bytes, tenant: str) -> CanonicalDevice:
    platform = _clean(info.platform, "platform")
    if platform not in PLATFORMS:
        raise errors.invalid_argument(f"device.platform must be one of {', '.join(PLATFORMS)}",
                                      device__platform="unknown platform")
    if len(info.extra) > 16 or any(len(k) > MAX_FIELD or len(v) > MAX_FIELD for k, v in info.extra.items()):
        raise errors.invalid_argument("device.extra: at most 16 entries of 128 characters", device__extra="too large")
    if info.screen_width < 0 or info.screen_height < 0 or max(info.screen_width, info.screen_height) > 100000:
        raise errors.invalid_argument("device screen size out of range", device__screen_width="out of range")
    install = _clean(info.install_id, "install_id")
    os_version = _clean(info.os_version, "os_version")
    w, h = sorted((info.screen_width, info.screen_height))
    soft = {
        "model": _clean(info.model, "model"),
        "os_major": _major(os_version),
        "os_version": os_version,
        "app_major": _major(_clean(info.app_version, "app_version")),
        "locale": _clean(info.locale, "locale").replace("_", "-"),
        "timezone": _clean(info.timezone, "timezone"),
        "screen": f"{w}x{h}" if w and h else "",
    }
    hard = (platform, "install", install) if install else (platform, "browser", soft["model"], soft["screen"], soft["timezone"])
    return CanonicalDevice(platform, "fp1_" + keyed_hash(key, tenant, *hard)[:40], soft)


def similarity(a: dict[str, str], b: dict[str, str]) -> float:
    """Weighted share of soft attributes that agree, over those both sides report."""
    total = agree = 0.0
    for name, weight in SOFT_WEIGHTS.items():
        x, y = a.get(name, ""), b.get(name, "")
        if x and y:
            total += weight
            agree += weight if x == y else 0.0
    return 1.0 if total == 0 else agree / total


def match(device: CanonicalDevice, bound: list[DeviceRecord], drift_similarity: float) -> tuple[DeviceState, DeviceRecord | None]:
    """("bound" | "drifted" | "new" | "unbound", the bound device it is)."""
    for rec in bound:
        if rec.fingerprint == device.fingerprint and rec.revoked_at is None:
            sim = similarity(device.soft, dict(rec.attributes))
            if sim >= 0.999:
                return "bound", rec
            if sim >= drift_similarity:
                return "drifted", rec
            return "new", None
    return ("new" if bound else "unbound"), None


def load_public_key(der: bytes):
    if not der or len(der) > MAX_PUBLIC_KEY:
        raise errors.invalid_argument("public_key must be a DER SubjectPublicKeyInfo", public_key="missing or too large")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise errors.invalid_argument("public_key is not a DER SubjectPublicKeyInfo", public_key="not DER SPKI") from None
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise errors.invalid_argument("public_key must be ECDSA P-256 or Ed25519", public_key="unsupported key type")


def verify_signature(public_der: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519, or ECDSA P-256 with SHA-256 (DER, or raw r||s as WebCrypto produces)."""
    key = load_public_key(public_der)
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, message)
        else:
            if len(signature) == 64:
                signature = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                                       int.from_bytes(signature[32:], "big"))
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True
