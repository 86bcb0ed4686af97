"""Signing keys behind one interface, whatever holds them.

The audit trail signs its head and checkpoints with a :class:`Signer`; the MFA signs decision
tokens with the newest key of a rotating set kept in a :class:`SigningKeyVault`. Two backends
implement both (``keys.backend``): files under ``data_dir`` (:class:`FileSigner`,
:class:`FileKeyVault`; the embedded default) and a PKCS#11 token whose keys never leave it
(:mod:`services.common.crypto.pkcs11`). Verifiers need only the public keys.

Signatures are JOSE-shaped: Ed25519 (``EdDSA``) 64 bytes; ECDSA P-256 (``ES256``) r||s, 64 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from filelock import FileLock

PublicKey = Union[Ed25519PublicKey, ec.EllipticCurvePublicKey]


class Signer(Protocol):
    key_id: str
    algorithm: str  # JOSE name: "EdDSA" or "ES256"
    public_key: PublicKey

    def sign(self, message: bytes) -> bytes: ...


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_public_bytes(public_key: PublicKey) -> bytes:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def algorithm_of(public_key: PublicKey) -> str:
    if isinstance(public_key, Ed25519PublicKey):
        return "EdDSA"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError(f"unsupported signing key type {type(public_key).__name__}")


def key_id(public_key: PublicKey) -> str:
    """A stable id of a public key, e.g. ``ed25519:0123456789abcdef``."""
    prefix = "ed25519" if algorithm_of(public_key) == "EdDSA" else "p256"
    return f"{prefix}:" + hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:16]


def verify_signature(public_key: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(public_key, Ed25519PublicKey):
            public_key.verify(bytes(signature), message)
        else:
            if len(signature) != 64:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
            public_key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def public_jwk(public_key: PublicKey, kid: str) -> dict[str, str]:
    if algorithm_of(public_key) == "EdDSA":
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw_public_bytes(public_key)), "kid": kid,
                "alg": "EdDSA", "use": "sig"}
    numbers = public_key.public_numbers()  # type: ignore[union-attr]
    return {"kty": "EC", "crv": "P-256", "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")), "kid": kid, "alg": "ES256", "use": "sig"}


def public_key_pem(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes) -> PublicKey:
    key = serialization.load_pem_public_key(pem)
    algorithm_of(key)  # type: ignore[arg-type]  # raises for other key types
    return key  # type: ignore[return-value]


class KeySigner:
    """A signer over a private key held in this process (the file backend)."""

    def __init__(self, private_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, kid: str | None = None) -> None:
        self._key = private_key
        self.public_key: PublicKey = private_key.public_key()
        self.algorithm = algorithm_of(self.public_key)
        self.key_id = kid or key_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._key, Ed25519PrivateKey):
            return self._key.sign(message)
        r, s = decode_dss_signature(self._key.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key_id})"


class FileSigner(KeySigner):
    """An Ed25519 key in a PEM file (mode 0600), created on first use."""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FileSigner:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> FileSigner:
        try:
            return cls.create(path)
        except FileExistsError:  # made before, or by another process first: use theirs
            return cls.load(path)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> FileSigner:
        """A new key in a new file; FileExistsError (and no key made) when the file exists."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        return cls(key)

    def public_key_pem(self) -> bytes:
        return public_key_pem(self.public_key)


# -- rotating key sets ------------------------------------------------------------------------


class SigningKeyVault(Protocol):
    """Where a rotating set of signing keys lives. An entry is a JSON-able dict with at least
    ``kid``, ``created`` and ``retired`` (Unix seconds or None), oldest first; the vault may keep
    more in it (the file vault: the private key's PEM)."""

    def entries(self) -> list[dict[str, Any]]: ...

    def exclusive(self) -> Any:
        """A context manager held while the entries are changed (serialises rotations)."""
        ...

    def save(self, entries: list[dict[str, Any]]) -> None: ...

    def generate(self) -> dict[str, Any]:
        """A new key; returns its entry (``kid`` set; the caller sets the times and saves it)."""
        ...

    def signer(self, entry: dict[str, Any]) -> Signer: ...

    def destroy(self, entry: dict[str, Any]) -> None:
        """Called once the entry is no longer saved."""
        ...


def jwt_kid(public_key: PublicKey) -> str:
    return "mfa-" + b64url(raw_public_bytes(public_key))[:16]


class FileKeyVault:
    """Keys in one JSON file (mode 0600) shared by replicas through the data directory: re-read
    when its mtime changes; changes hold a file lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file_lock = FileLock(str(path) + ".lock")
        self._stamp: tuple[int, int] | None = None
        self._entries: list[dict[str, Any]] = []
        self._signers: dict[str, KeySigner] = {}

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return []
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._entries = json.loads(self.path.read_text())["keys"]
                self._stamp = stamp
            return list(self._entries)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._file_lock:
            self._stamp = None  # re-read under the lock: another process may have written
            yield

    def save(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"keys": entries}, fh)
        os.replace(tmp, self.path)
        self._stamp = None

    def generate(self) -> dict[str, Any]:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        return {"kid": jwt_kid(key.public_key()), "pem": pem}

    def signer(self, entry: dict[str, Any]) -> Signer:
        kid = entry["kid"]
        hit = self._signers.get(kid)
        if hit is None:
            key = serialization.load_pem_private_key(entry["pem"].encode(), None)
            hit = self._signers[kid] = KeySigner(key, kid)  # type: ignore[arg-type]
        return hit

    def destroy(self, entry: dict[str, Any]) -> None:
        self._signers.pop(entry["kid"], None)
