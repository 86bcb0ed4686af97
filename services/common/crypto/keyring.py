"""Key-encryption keys (KEKs) and the pseudonym key.

A :class:`Keyring` wraps and unwraps per-record data keys under a named KEK and says which KEK
is the primary (the one new records are sealed under). Three implementations:

* :class:`LocalKeyring` — a JSON file (mode 0600, created on first use at
  ``CommonSettings.keyring_file``). It re-reads the file when its mtime/inode/size change, so running
  services pick up a rotation done by ``biogate keys rotate`` in another process without a
  restart: :meth:`~Keyring.primary_key_id` (asked once per seal) always looks at the file's stat,
  other lookups at most every ``check_interval_s``.
* :class:`StaticKeyring` — the same JSON from the ``BIOGATE_KEYRING_JSON`` environment variable
  (development, containers). Read-only: rotate by changing the variable and restarting.
* :class:`~services.common.crypto.hsm.Pkcs11Keyring` — KEKs inside a PKCS#11 token
  (``keys.backend: pkcs11``).
* an external KMS adapter: set ``KeysConfig.kms = "package.module:factory"``; ``factory``
  is called with the settings (:class:`~services.common.config.CommonSettings`) and must return an object
  satisfying :class:`Keyring`. The adapter keeps the KEKs inside the KMS and implements
  ``wrap``/``unwrap`` as the KMS's encrypt/decrypt calls (with ``aad`` as the encryption
  context); ``fingerprint`` may be ``b""`` when the KMS cannot expose a key check value;
  ``add_key``/``remove_key`` may raise :class:`KeyringError` if keys are managed in the KMS;
  ``add_key`` must create the key under the ``key_id`` it is given (the audit trail names that id
  before the key exists), and ``primary_key_id`` must see a primary changed by another process.

The pseudonym key (HMAC key for :class:`~services.common.privacy.Pseudonymizer`) lives in the
same keyring but is *not* a KEK: ``keys rotate`` never changes it, because every pseudonym
already written to the audit trail would stop linking to its subject. Changing it is a
deliberate re-pseudonymisation, outside this module.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import importlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import aead
from .errors import KeyringError, NoKeyringError, UnknownKeyError, WrongKeyError

if TYPE_CHECKING:
    from services.common.config import CommonSettings

log = logging.getLogger(__name__)

ENV_VAR = "BIOGATE_KEYRING_JSON"
_FORMAT = "biogate-keyring"


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    cipher: str  # also the cipher new envelopes under this key seal their payload with
    created: str  # ISO 8601, UTC
    primary: bool
    fingerprint: bytes  # key check value, written into envelopes; b"" if unknown


@runtime_checkable
class Keyring(Protocol):
    def primary_key_id(self) -> str:
        """The primary as the key store holds it now, also when another process rotated."""
        ...

    def keys(self) -> list[KeyInfo]: ...

    def key_info(self, key_id: str) -> KeyInfo:
        """Raises UnknownKeyError."""
        ...

    def wrap(self, key_id: str, data_key: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, key_id: str, wrapped: bytes, aad: bytes) -> bytes:
        """Raises UnknownKeyError, or WrongKeyError when authentication fails."""
        ...

    def pseudonym_key(self) -> bytes: ...

    def add_key(self, cipher: str | None = None, key_id: str | None = None) -> KeyInfo:
        """Create a KEK (under ``key_id``, default a new one) and make it the primary."""
        ...

    def remove_key(self, key_id: str) -> None:
        """Forget a non-primary KEK (callers check that nothing uses it)."""
        ...


def fingerprint(material: bytes) -> bytes:
    return hmac.new(material, b"biogate-kek-check-v1", hashlib.sha256).digest()[:8]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_key_id() -> str:
    # Microseconds: the PKCS#11 keyring takes the greatest id as its primary, so a key made later
    # (a rotation in the same second as `keys init`) must sort after the earlier ones.
    return "k" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + secrets.token_hex(3)


@dataclass
class _Kek:
    key_id: str
    cipher: str
    material: bytes
    created: str
    fingerprint: bytes = field(init=False, repr=False)
    aead: aead.Aead = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint(self.material)
        self.aead = aead.Aead(self.cipher, self.material)


class _KeyringData:
    """The parsed keyring document."""

    def __init__(self, primary: str, keks: dict[str, _Kek], pseudonym_key: bytes) -> None:
        if primary not in keks:
            raise KeyringError(f"primary key {primary!r} is not among the keys")
        self.primary = primary
        self.keks = keks
        self.pseudonym_key = pseudonym_key

    @classmethod
    def new(cls, cipher: str, key_id: str | None = None) -> _KeyringData:
        kek = _Kek(key_id or new_key_id(), cipher, aead.new_key(cipher), _now())
        return cls(kek.key_id, {kek.key_id: kek}, secrets.token_bytes(32))

    @classmethod
    def parse(cls, text: str, source: str) -> _KeyringData:
        try:
            doc = json.loads(text)
            if doc.get("format") != _FORMAT or doc.get("version") != 1:
                raise KeyringError(f"{source}: not a version 1 BioGate keyring")
            keks = {}
            for k in doc["keys"]:
                material = base64.b64decode(k["material"])
                if aead.KEY_BYTES.get(k["cipher"]) != len(material):
                    raise KeyringError(f"{source}: key {k['id']!r} has a bad cipher or length")
                kek = _Kek(k["id"], k["cipher"], material, k["created"])
                keks[kek.key_id] = kek
            pkey = base64.b64decode(doc["pseudonym_key"])
            return cls(doc["primary"], keks, pkey)
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyringError(f"{source}: malformed keyring ({type(exc).__name__})") from None

    def dump(self) -> str:
        doc: dict[str, Any] = {
            "format": _FORMAT,
            "version": 1,
            "primary": self.primary,
            "pseudonym_key": base64.b64encode(self.pseudonym_key).decode(),
            "keys": [
                {
                    "id": k.key_id,
                    "cipher": k.cipher,
                    "material": base64.b64encode(k.material).decode(),
                    "created": k.created,
                }
                for k in self.keks.values()
            ],
        }
        return json.dumps(doc, indent=2) + "\n"


class StaticKeyring:
    """A keyring held in memory, from a JSON document (``BIOGATE_KEYRING_JSON``). Read-only."""

    def __init__(self, text: str, source: str = ENV_VAR) -> None:
        self._data = _KeyringData.parse(text, source)
        self._source = source

    def _current(self, force: bool = False) -> _KeyringData:
        return self._data

    def _kek(self, key_id: str) -> _Kek:
        kek = self._current().keks.get(key_id)
        if kek is None:  # perhaps added by a rotation since the last look at the source
            kek = self._current(force=True).keks.get(key_id)
        if kek is None:
            raise UnknownKeyError(key_id)
        return kek

    def primary_key_id(self) -> str:
        return self._current().primary

    def keys(self) -> list[KeyInfo]:
        data = self._current()
        return [self._info(k, data.primary) for k in data.keks.values()]

    def key_info(self, key_id: str) -> KeyInfo:
        return self._info(self._kek(key_id), self._current().primary)

    @staticmethod
    def _info(k: _Kek, primary: str) -> KeyInfo:
        return KeyInfo(k.key_id, k.cipher, k.created, k.key_id == primary, k.fingerprint)

    def wrap(self, key_id: str, data_key: bytes, aad: bytes) -> bytes:
        return self._kek(key_id).aead.seal(data_key, aad)

    def unwrap(self, key_id: str, wrapped: bytes, aad: bytes) -> bytes:
        kek = self._kek(key_id)
        try:
            return kek.aead.open(wrapped, aad)
        except aead.AeadError:
            raise WrongKeyError(f"the data key does not unwrap under key {key_id!r}") from None

    def pseudonym_key(self) -> bytes:
        return self._current().pseudonym_key

    def add_key(self, cipher: str | None = None, key_id: str | None = None) -> KeyInfo:
        raise KeyringError(f"the keyring from {self._source} is read-only")

    def remove_key(self, key_id: str) -> None:
        raise KeyringError(f"the keyring from {self._source} is read-only")

    def dump_json(self) -> str:
        """The keyring document (secret!), e.g. to move a development keyring into the env var."""
        return self._current().dump()


class LocalKeyring(StaticKeyring):
    """A keyring in a 0600 JSON file, created on first use, reloaded when the file changes.

    The primary is read from the file as it is now (one stat per seal; the file is re-read when
    it changed): a rotation made by another process seals the next record here under the new key.
    Other lookups check the stat at most every ``check_interval_s`` (0: on every call); an
    envelope under a key id not yet seen makes it look at once (a record re-wrapped by that
    rotation).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        cipher: str = "AES-256-GCM",
        create: bool = True,
        check_interval_s: float = 0.1,
        first_key_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._interval = check_interval_s
        self._next_check = 0.0
        self._source = str(self.path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        if not self.path.exists():
            if not create:
                raise NoKeyringError(f"{self.path}: no keyring (run `biogate keys init`)")
            with self._file_lock():
                if not self.path.exists():
                    self._write(_KeyringData.new(cipher, first_key_id))
                    log.info("created keyring %s", self.path)
        self._data = self._load()
        self._default_cipher = cipher

    # -- reading ------------------------------------------------------------------------------

    def _load(self) -> _KeyringData:
        try:
            st = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyringError(f"{self.path}: cannot read the keyring: {exc.strerror}") from None
        if st.st_mode & 0o077:
            log.warning("keyring %s is readable by others (mode %o); chmod 600", self.path, st.st_mode & 0o777)
        data = _KeyringData.parse(text, str(self.path))
        self._stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        return data

    def _current(self, force: bool = False) -> _KeyringData:
        now = time.monotonic()
        if now < self._next_check and not force:
            return self._data
        self._next_check = now + self._interval
        try:
            st = os.stat(self.path)
        except OSError:
            return self._data  # keep serving from memory if the file briefly vanishes
        if (st.st_mtime_ns, st.st_ino, st.st_size) != self._stamp:
            with self._lock:
                if (st.st_mtime_ns, st.st_ino, st.st_size) != self._stamp:
                    self._data = self._load()
                    log.info("reloaded keyring %s (primary %s)", self.path, self._data.primary)
        return self._data

    def primary_key_id(self) -> str:
        # Not throttled: a seal under a primary another process replaced would leave a record that
        # the rotation's passes may already have finished with, and block `keys retire`.
        return self._current(force=True).primary

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, data: _KeyringData) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keyring-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:  # mkstemp creates it 0600
                fh.write(data.dump())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _modify(self, change) -> None:  # change(data) mutates a freshly read document
        with self._file_lock(), self._lock:
            data = self._load()  # re-read under the lock: another process may have written
            change(data)
            self._write(data)
            self._data = self._load()

    def add_key(self, cipher: str | None = None, key_id: str | None = None) -> KeyInfo:
        cipher = cipher or self._default_cipher
        kek = _Kek(key_id or new_key_id(), cipher, aead.new_key(cipher), _now())

        def change(data: _KeyringData) -> None:
            if kek.key_id in data.keks:
                raise KeyringError(f"key {kek.key_id!r} exists already")
            data.keks[kek.key_id] = kek
            data.primary = kek.key_id

        self._modify(change)
        log.info("added key %s (%s) as primary", kek.key_id, cipher)
        return self.key_info(kek.key_id)

    def remove_key(self, key_id: str) -> None:
        def change(data: _KeyringData) -> None:
            if key_id not in data.keks:
                raise UnknownKeyError(key_id)
            if key_id == data.primary:
                raise KeyringError(f"key {key_id!r} is the primary; rotate before retiring it")
            del data.keks[key_id]

        self._modify(change)
        log.info("removed key %s", key_id)


def load_kms(spec: str, settings: CommonSettings) -> Keyring:
    """Build an external KMS/HSM adapter from ``"package.module:factory"``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise KeyringError(f"keys.kms must be 'module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    keyring = factory(settings)
    if not isinstance(keyring, Keyring):
        raise KeyringError(f"{spec} did not return a Keyring")
    return keyring


def keyring_backend(settings: CommonSettings) -> str:
    """Which key store :func:`open_keyring` opens: "pkcs11", "kms", "env" or "file"."""
    if settings.keys.backend == "pkcs11":
        return "pkcs11"
    if settings.keys.kms:
        return "kms"
    return "env" if os.environ.get(ENV_VAR) else "file"


def open_keyring(settings: CommonSettings, create: bool = True, first_key_id: str | None = None) -> Keyring:
    """The keyring the configuration names: the PKCS#11 token (keys.backend), a KMS adapter, else
    $BIOGATE_KEYRING_JSON, else the file. ``create``: make the file or the token's first KEK (under
    ``first_key_id``) when there is none; else :class:`NoKeyringError`."""
    if settings.keys.backend == "pkcs11":
        from .backend import open_pkcs11_keyring

        return open_pkcs11_keyring(settings, create, first_key_id)
    if settings.keys.kms:
        return load_kms(settings.keys.kms, settings)
    env = os.environ.get(ENV_VAR)
    if env:
        return StaticKeyring(env)
    return LocalKeyring(settings.keyring_file, cipher=settings.keys.cipher, create=create, first_key_id=first_key_id)
