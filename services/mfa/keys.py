"""Keys the MFA service derives from the keyring's long-lived pseudonym key, each with its own
domain (HMAC-SHA256 as a KDF): nothing here is ever stored or logged."""

from __future__ import annotations

import hashlib
import hmac


def derive(master: bytes, purpose: str) -> bytes:
    return hmac.new(master, b"biogate-mfa-v1|" + purpose.encode(), hashlib.sha256).digest()


def keyed_hash(key: bytes, *parts: str) -> str:
    msg = b"".join(len(p.encode()).to_bytes(4, "big") + p.encode() for p in parts)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()
