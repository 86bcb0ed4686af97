"""Signed decisions: short-lived EdDSA (Ed25519) JWTs, their JWKS, and key rotation.

Keys live in one JSON file (mode 0600, like the audit signing key), shared by replicas through
the data directory: a replica reloads it when its mtime changes, and rotation holds a file lock.
The newest key signs. A rotated-out key stays in the JWKS until every token it signed has
expired (token lifetime plus a leeway), then it is dropped.

Claims: ``iss``; ``aud`` the tenant; ``sub`` the subject's keyed pseudonym, not the bank's
customer reference (tokens travel through apps and browsers and end up in logs; the relying party
binds the token to its customer by ``sid``, the session it opened for that customer); ``sid``;
``act`` the action and, for payments, ``amt`` (dynamic linking); ``decision``; ``amr`` (RFC 8176);
``acr``; ``iat``/``nbf``/``exp``; ``jti``.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from filelock import FileLock

LEEWAY_S = 60


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _kid(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "mfa-" + _b64(raw)[:16]


class SigningKeys:
    def __init__(self, path: Path, token_ttl_s: int, max_age_s: int, clock: Callable[[], float] = time.time) -> None:
        self.path, self.token_ttl_s, self.max_age_s, self.clock = path, token_ttl_s, max_age_s, clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._doc: dict[str, Any] = {"keys": []}
        self._private: dict[str, Ed25519PrivateKey] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file_lock = FileLock(str(self.path) + ".lock")
        if not self._load() or not self._doc["keys"]:
            self.rotate()

    def _load(self) -> bool:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            doc = json.loads(self.path.read_text())
            self._private = {k["kid"]: serialization.load_pem_private_key(k["pem"].encode(), None) for k in doc["keys"]}
            self._doc, self._stamp = doc, stamp
        return True

    def _write(self, doc: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, self.path)

    def rotate(self) -> str:
        """A new signing key; the previous one only verifies from now on."""
        with self._lock, self._file_lock:
            self._stamp = None
            self._load()
            now = self.clock()
            keep = []
            for k in self._doc["keys"]:
                if k.get("retired") is None:
                    k = {**k, "retired": now}
                if now - k["retired"] <= self.token_ttl_s + LEEWAY_S:
                    keep.append(k)
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
            kid = _kid(key)
            self._write({"keys": [*keep, {"kid": kid, "pem": pem, "created": now, "retired": None}]})
            self._stamp = None
            self._load()
            return kid

    def current(self) -> tuple[str, Ed25519PrivateKey]:
        with self._lock:
            self._load()
            live = [k for k in self._doc["keys"] if k.get("retired") is None]
        if not live or self.clock() - live[-1]["created"] > self.max_age_s:
            self.rotate()
            return self.current()
        kid = live[-1]["kid"]
        return kid, self._private[kid]

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            self._load()
            now = self.clock()
            keys = []
            for k in self._doc["keys"]:
                if k.get("retired") is not None and now - k["retired"] > self.token_ttl_s + LEEWAY_S:
                    continue
                raw = self._private[k["kid"]].public_key().public_bytes(serialization.Encoding.Raw,
                                                                         serialization.PublicFormat.Raw)
                keys.append({"kty": "OKP", "crv": "Ed25519", "x": _b64(raw), "kid": k["kid"], "alg": "EdDSA", "use": "sig"})
        return {"keys": keys}


class TokenIssuer:
    def __init__(self, keys: SigningKeys, issuer: str, ttl_s: int) -> None:
        self.keys, self.issuer, self.ttl_s = keys, issuer, ttl_s

    def issue(self, claims: dict[str, Any], now: float | None = None) -> tuple[str, float]:
        now = time.time() if now is None else now
        kid, key = self.keys.current()
        payload = {"iss": self.issuer, "iat": int(now), "nbf": int(now), "exp": int(now) + self.ttl_s,
                   "jti": uuid.uuid4().hex, **claims}
        return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": kid}), payload["exp"]


def verify_token(token: str, jwks_json: str, issuer: str, audience: str) -> dict[str, Any]:
    """What a relying party does: pick the key by kid from the JWKS and check signature and
    claims. Raises jwt.InvalidTokenError (expired, tampered, unknown key, wrong audience)."""
    header = jwt.get_unverified_header(token)
    if header.get("alg") != "EdDSA":
        raise jwt.InvalidAlgorithmError("only EdDSA tokens are accepted")
    keyset = jwt.PyJWKSet.from_json(jwks_json)
    try:
        key = keyset[header.get("kid", "")]
    except KeyError:
        raise jwt.InvalidKeyError("the token's key is not in the key set") from None
    return jwt.decode(token, key.key, algorithms=["EdDSA"], issuer=issuer, audience=audience,
                      options={"require": ["exp", "iat", "sub", "sid", "decision"]})
