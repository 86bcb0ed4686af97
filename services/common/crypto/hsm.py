"""The PKCS#11 key backend (``keys.backend: pkcs11``): every key BioGate uses lives in one token
(a network HSM, a cloud HSM's PKCS#11 library, or SoftHSM2) and never leaves it.

Objects, all token objects created ``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE``, labelled with
``keys.pkcs11.label_prefix`` (``biogate`` below):

* ``biogate-kek``: AES-256 key-encryption keys, ``CKA_ID`` the key id. Data keys are wrapped and
  unwrapped inside the token by AES-GCM with the envelope's associated data; the wrapped form is
  nonce (12) || ciphertext || tag (16). The key check value written into envelopes is the first
  8 bytes of the key's AES-CMAC of a fixed message. The newest key (ids sort by creation time)
  is the primary, as ``keys rotate`` makes it.
* ``biogate-pseudonym``: an HMAC key; the pseudonym key the services hold is its HMAC-SHA256 of a
  fixed label, the same in every replica (the root secret stays in the token).
* ``biogate-audit``: the Ed25519 key pair that signs the audit trail's head and checkpoints.
* ``biogate-mfa-jwt {...}``: the MFA's decision-token key pairs (Ed25519, CKM_EDDSA); the label
  carries the key's creation and retirement times, ``CKA_ID`` its kid.

Replicas share the token instead of files. Key creation on first use is guarded only within a
process: create the keys once before replicas start (``biogate migrate``, the Kubernetes Job, does
it); should two processes still create one at once, all of them settle on the same (the lowest
``CKA_ID``).

The user PIN comes from the environment variable ``keys.pkcs11.pin_env``, never from the YAML.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import KeyCreatedElsewhereError, KeyringError, NoKeyError, NoKeyringError, UnknownKeyError, WrongKeyError
from .keyring import KeyInfo, new_key_id
from .signing import PublicKey, algorithm_of, jwt_kid, key_id

if TYPE_CHECKING:
    from services.common.config import Pkcs11Config

_ED25519_OID = "1.3.101.112"
_KCV_MESSAGE = b"biogate-kek-check-v1"
_PSEUDONYM_LABEL = b"biogate-pseudonym-key-v1"
_CIPHER = "AES-256-GCM"
_NONCE = 12
_LIST_TTL_S = 1.0  # how long a listing of the token's keys serves lookups of known ids (not the primary)


def _pkcs11():
    import pkcs11

    return pkcs11


_libs: dict[str, Any] = {}
_tokens: dict[tuple[str, str, str], Pkcs11Token] = {}
_tokens_lock = threading.Lock()


def open_token(cfg: Pkcs11Config) -> Pkcs11Token:
    """The process's logged-in session on the configured token (one per token)."""
    key = (str(cfg.module), cfg.token_label, cfg.label_prefix)
    with _tokens_lock:
        token = _tokens.get(key)
        if token is None or token.closed:
            token = _tokens[key] = Pkcs11Token(cfg)
        return token


class Pkcs11Token:
    """One read-write user session on the token, shared by the keyring and the signers. Each
    operation holds a lock: PKCS#11 allows one operation at a time per session."""

    def __init__(self, cfg: Pkcs11Config) -> None:
        p11 = _pkcs11()
        pin = os.environ.get(cfg.pin_env)
        if not pin:
            raise KeyringError(f"keys.pkcs11.pin_env: set the environment variable {cfg.pin_env} to the token's user PIN")
        module = str(cfg.module)
        try:
            lib = _libs.get(module) or _libs.setdefault(module, p11.lib(module))
        except (RuntimeError, OSError) as exc:
            raise KeyringError(f"keys.pkcs11.module {module}: cannot load the PKCS#11 library ({exc})") from None

        def reload() -> None:
            # SoftHSM lists its tokens when the library is initialised; a list read while another
            # process wrote the token's files stays wrong (NoSuchToken on every later try) until it
            # is initialised again, which ends every session of this process: only when it has none.
            if not any(k[0] == module and not t.closed for k, t in _tokens.items()):
                lib.reinitialize()

        self.session = self._transient(lambda: self._open(lib.get_token(token_label=cfg.token_label), pin, cfg),
                                       cfg, reload)
        self.p11 = p11
        self.prefix = cfg.label_prefix
        self.lock = threading.RLock()
        self.closed = False

    @staticmethod
    def _open(token: Any, pin: str, cfg: Pkcs11Config) -> Any:
        """A logged-in session."""
        E = _pkcs11().exceptions
        try:
            return token.open(user_pin=pin, rw=True)
        except E.UserAlreadyLoggedIn:  # login is per process: another session did it
            return token.open(rw=True)
        except E.PinIncorrect:
            raise KeyringError(f"the PIN in ${cfg.pin_env} is not the user PIN of token {cfg.token_label!r}") from None

    @staticmethod
    def _transient(step: Callable[[], Any], cfg: Pkcs11Config, between: Callable[[], None], tries: int = 5) -> Any:
        """``step()``, with transient token errors retried a few times, then reported by name: a
        network HSM's hiccup, or SoftHSM reading its files while another process writes them, which
        fails finding the token (GeneralError, even NoSuchToken) as well as opening a session."""
        E = _pkcs11().exceptions
        for attempt in range(tries):
            try:
                return step()
            except E.PKCS11Error as exc:
                if attempt + 1 < tries:
                    time.sleep(0.1 * 2**attempt)
                    between()
                elif isinstance(exc, (E.NoSuchToken, E.MultipleTokensReturned)):
                    raise KeyringError(f"keys.pkcs11.token_label: no single token labelled {cfg.token_label!r} "
                                       f"in {cfg.module}") from None
                else:
                    raise KeyringError(f"token {cfg.token_label!r}: cannot open a session "
                                       f"({type(exc).__name__} {exc})") from None
        raise AssertionError("unreachable")

    def label(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def find(self, label: str | None = None, cls: Any = None, key_id: bytes | None = None) -> list[Any]:
        A = self.p11.Attribute
        template: dict[Any, Any] = {}
        for attr, value in ((A.LABEL, label), (A.CLASS, cls), (A.ID, key_id)):
            if value is not None:
                template[attr] = value
        with self.lock:
            return list(self.session.get_objects(template))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.session.close()

    # -- object creation -----------------------------------------------------------------------

    def _private(self) -> dict[Any, Any]:
        A = self.p11.Attribute
        return {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False}

    def new_secret(self, kind: str, label: str, key_id: bytes) -> Any:
        p11, A = self.p11, self.p11.Attribute
        template = {**self._private(), A.ID: key_id}
        if kind == "aes":
            template.update({A.ENCRYPT: True, A.DECRYPT: True, A.SIGN: True, A.VERIFY: False,
                             A.WRAP: False, A.UNWRAP: False})
            with self.lock:
                return self.session.generate_key(p11.KeyType.AES, 256, store=True, label=label, template=template)
        template.update({A.SIGN: True, A.VERIFY: False, A.ENCRYPT: False, A.DECRYPT: False})
        with self.lock:
            return self.session.generate_key(p11.KeyType.GENERIC_SECRET, 256, store=True, label=label,
                                             template=template)

    def new_ed25519(self, label: str, key_id: bytes) -> tuple[Any, Any]:
        p11, A = self.p11, self.p11.Attribute
        from pkcs11.util.ec import encode_named_curve_parameters

        with self.lock:
            params = self.session.create_domain_parameters(
                p11.KeyType.EC_EDWARDS, {A.EC_PARAMS: encode_named_curve_parameters(_ED25519_OID)}, local=True)
            public, private = params.generate_keypair(
                mechanism=p11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN, store=True, label=label, id=key_id,
                public_template={A.TOKEN: True, A.VERIFY: True},
                private_template={**self._private(), A.SIGN: True})
        return public, private

    def public_key(self, public_obj: Any) -> PublicKey:
        from asn1crypto.core import OctetString

        with self.lock:
            point = public_obj[self.p11.Attribute.EC_POINT]
        return Ed25519PublicKey.from_public_bytes(OctetString.load(point).native)

    def destroy_pair(self, key_id: bytes) -> None:
        with self.lock:
            for obj in self.find(key_id=key_id):
                obj.destroy()

    def first_by_id(self, objects: list[Any]) -> Any | None:
        with self.lock:
            return min(objects, key=lambda o: bytes(o[self.p11.Attribute.ID]), default=None)


class Pkcs11Signer:
    """A :class:`~services.common.crypto.signing.Signer` whose private key is in the token."""

    def __init__(self, token: Pkcs11Token, private_obj: Any, public_key: PublicKey, kid: str | None = None) -> None:
        self._token, self._key = token, private_obj
        self.public_key = public_key
        self.algorithm = algorithm_of(public_key)
        self.key_id = kid or key_id(public_key)

    def sign(self, message: bytes) -> bytes:
        with self._token.lock:
            return bytes(self._key.sign(message, mechanism=self._token.p11.Mechanism.EDDSA))

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self.key_id})"


def _pair(token: Pkcs11Token, label: str, create: bool) -> tuple[Any, Any]:
    """The (public, private) objects of the single-instance key pair labelled ``label``."""
    C = token.p11.ObjectClass
    private = token.first_by_id(token.find(label=label, cls=C.PRIVATE_KEY))
    if private is None:
        if not create:
            raise NoKeyError(f"token has no key labelled {label!r} (run `biogate migrate`)")
        token.new_ed25519(label, secrets.token_bytes(8))
        private = token.first_by_id(token.find(label=label, cls=C.PRIVATE_KEY))
        if private is None:
            raise KeyringError(f"token did not keep the key labelled {label!r} it was asked to create")
    kid = bytes(private[token.p11.Attribute.ID])
    public = token.find(key_id=kid, cls=C.PUBLIC_KEY)
    if not public:
        raise KeyringError(f"token key {label!r} has no public key object")
    return public[0], private


def audit_signer(token: Pkcs11Token, create: bool = True, which: str = "audit") -> Pkcs11Signer:
    """The audit signing key (``which``: ``audit``, or ``audit-next``, the key `biogate audit
    new-key` made and `biogate audit switch-key` makes the audit key)."""
    public, private = _pair(token, token.label(which), create)
    return Pkcs11Signer(token, private, token.public_key(public))


def create_audit_signer(token: Pkcs11Token, which: str = "audit") -> Pkcs11Signer:
    """Make the audit key pair (or the next one); KeyCreatedElsewhereError when the token holds one already."""
    label = token.label(which)
    if token.find(label=label, cls=token.p11.ObjectClass.PRIVATE_KEY):
        raise KeyCreatedElsewhereError(f"token holds a key labelled {label!r} already")
    mine = secrets.token_bytes(8)
    token.new_ed25519(label, mine)
    signer = audit_signer(token, create=False, which=which)
    first = token.first_by_id(token.find(label=label, cls=token.p11.ObjectClass.PRIVATE_KEY))
    with token.lock:
        chosen = bytes(first[token.p11.Attribute.ID]) if first is not None else None
    if chosen != mine:  # another process made one at the same moment; every process signs with the first
        token.destroy_pair(mine)
        raise KeyCreatedElsewhereError(f"another process made the key labelled {label!r} meanwhile")
    return signer


def switch_audit_signer(token: Pkcs11Token) -> None:
    """Make the next audit key the audit key: relabel its objects ``audit``, then the old key's
    ``audit-retired`` (kept: processes started before sign with it until they restart). In between
    both are labelled ``audit`` and a process starting then takes either: both are trusted."""
    C = token.p11.ObjectClass
    nxt = token.first_by_id(token.find(label=token.label("audit-next"), cls=C.PRIVATE_KEY))
    if nxt is None:
        raise NoKeyError(f"token has no key labelled {token.label('audit-next')!r} (run `biogate audit new-key`)")
    new_id = _object_id(token, nxt)
    old_ids = {_object_id(token, o) for o in token.find(label=token.label("audit"), cls=C.PRIVATE_KEY)} - {new_id}
    _relabel(token, "audit-next", new_id, "audit")
    for old_id in sorted(old_ids):
        _relabel(token, "audit", old_id, "audit-retired")


def retired_audit_key(token: Pkcs11Token, key_id_: str) -> Any | None:
    """The private object of the retired audit key ``key_id_`` (labelled ``audit-retired``), or None."""
    C = token.p11.ObjectClass
    for private in token.find(label=token.label("audit-retired"), cls=C.PRIVATE_KEY):
        public = token.find(key_id=_object_id(token, private), cls=C.PUBLIC_KEY)
        if public and key_id(token.public_key(public[0])) == key_id_:
            return private
    return None


def destroy_retired_audit_key(token: Pkcs11Token, key_id_: str) -> None:
    """Destroy the retired audit key's private object. Its public object stays: it signs nothing,
    and shows an operator listing the token which key the trail's older signatures are under."""
    private = retired_audit_key(token, key_id_)
    if private is None:
        raise NoKeyError(f"token has no private key {key_id_} labelled {token.label('audit-retired')!r}")
    with token.lock:
        private.destroy()


def _object_id(token: Pkcs11Token, obj: Any) -> bytes:
    with token.lock:
        return bytes(obj[token.p11.Attribute.ID])


def _relabel(token: Pkcs11Token, what: str, object_id: bytes, to: str) -> None:
    """Relabel the objects (private and public key) ``what`` with ``object_id`` as ``to``."""
    for obj in token.find(label=token.label(what), key_id=object_id):
        with token.lock:
            obj[token.p11.Attribute.LABEL] = token.label(to)


# -- template key-encryption keys --------------------------------------------------------------


def _created_of(key_id_: str) -> str:
    try:
        stamp = datetime.strptime(key_id_[1:16], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
        return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return ""


class Pkcs11Keyring:
    """A :class:`~services.common.crypto.keyring.Keyring` whose KEKs and pseudonym root key stay
    in the token; wrapping and unwrapping run inside it."""

    def __init__(self, token: Pkcs11Token, cipher: str = _CIPHER, create: bool = True,
                 first_key_id: str | None = None) -> None:
        if cipher != _CIPHER:
            raise KeyringError(f"keys.cipher {cipher}: the PKCS#11 backend wraps with {_CIPHER} only")
        self.token = token
        self._label = token.label("kek")
        self._keks: dict[str, Any] = {}
        self._listed_at = -1e9
        self._fingerprints: dict[str, bytes] = {}
        self._pseudonym: bytes | None = None
        if not self._list(force=True):
            if not create:
                raise NoKeyringError(f"token has no {self._label!r} key-encryption key (run `biogate keys init`)")
            self.add_key(key_id=first_key_id)

    def _list(self, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if force or now - self._listed_at > _LIST_TTL_S:
            C, A = self.token.p11.ObjectClass, self.token.p11.Attribute
            objects = self.token.find(label=self._label, cls=C.SECRET_KEY)
            with self.token.lock:
                self._keks = {bytes(o[A.ID]).decode(): o for o in objects}
            self._listed_at = now
        return self._keks

    def _kek(self, key_id_: str) -> Any:
        kek = self._list().get(key_id_) or self._list(force=True).get(key_id_)
        if kek is None:
            raise UnknownKeyError(key_id_)
        return kek

    def _with_kek(self, key_id_: str, use: Callable[[Any], bytes]) -> bytes:
        """``use(kek)`` under the token's lock; once more after a fresh listing when the handle went
        stale (another process or keyring instance retired or re-created keys)."""
        for attempt in (0, 1):
            kek = self._kek(key_id_)
            try:
                with self.token.lock:
                    return bytes(use(kek))
            except self.token.p11.exceptions.ObjectHandleInvalid:
                if attempt:
                    raise
                self._list(force=True)
        raise AssertionError("unreachable")

    def primary_key_id(self) -> str:
        # Listed afresh (one search in the token per seal): a seal under a primary another process
        # replaced would leave a record the rotation may have finished with, and block `keys retire`.
        return self._primary(self._list(force=True))

    @staticmethod
    def _primary(keks: dict[str, Any]) -> str:
        if not keks:
            raise KeyringError("the token holds no key-encryption key")
        return max(keks)

    def _fingerprint(self, key_id_: str) -> bytes:
        fp = self._fingerprints.get(key_id_)
        if fp is None:
            cmac = self.token.p11.Mechanism.AES_CMAC
            fp = self._fingerprints[key_id_] = self._with_kek(key_id_, lambda k: k.sign(_KCV_MESSAGE, mechanism=cmac))[:8]
        return fp

    def keys(self) -> list[KeyInfo]:
        return [self.key_info(k) for k in sorted(self._list())]

    def key_info(self, key_id_: str) -> KeyInfo:
        self._kek(key_id_)
        return KeyInfo(key_id_, _CIPHER, _created_of(key_id_), key_id_ == self._primary(self._list()),
                       self._fingerprint(key_id_))

    def wrap(self, key_id_: str, data_key: bytes, aad: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams

        nonce = secrets.token_bytes(_NONCE)
        gcm = self.token.p11.Mechanism.AES_GCM
        return nonce + self._with_kek(key_id_, lambda k: k.encrypt(data_key, mechanism=gcm,
                                                                    mechanism_param=GCMParams(nonce, aad, 128)))

    def unwrap(self, key_id_: str, wrapped: bytes, aad: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams

        if len(wrapped) <= _NONCE + 16:
            self._kek(key_id_)
            raise WrongKeyError(f"the wrapped data key is too short for key {key_id_!r}")
        E, gcm = self.token.p11.exceptions, self.token.p11.Mechanism.AES_GCM
        try:
            return self._with_kek(key_id_, lambda k: k.decrypt(wrapped[_NONCE:], mechanism=gcm,
                                                                mechanism_param=GCMParams(wrapped[:_NONCE], aad, 128)))
        except (E.GeneralError, E.EncryptedDataInvalid, E.EncryptedDataLenRange):
            raise WrongKeyError(f"the data key does not unwrap under key {key_id_!r}") from None

    def _pseudonym_object(self) -> Any | None:
        t = self.token
        return t.first_by_id(t.find(label=t.label("pseudonym"), cls=t.p11.ObjectClass.SECRET_KEY))

    def pseudonym_key_id(self) -> str | None:
        """The token object id (hex) of the pseudonym root key, None when the token has none."""
        key = self._pseudonym_object()
        if key is None:
            return None
        with self.token.lock:
            return bytes(key[self.token.p11.Attribute.ID]).hex()

    def create_pseudonym_key(self, key_id_hex: str) -> None:
        """Make the pseudonym root key under the object id ``key_id_hex`` (its creation is audited by
        services.common.crypto.provision)."""
        self.token.new_secret("hmac", self.token.label("pseudonym"), bytes.fromhex(key_id_hex))

    def pseudonym_key(self) -> bytes:
        if self._pseudonym is None:
            t = self.token
            key = self._pseudonym_object()
            if key is None:  # made, audited, by services.common.crypto.provision.ensure_keys
                raise NoKeyError(f"token has no key labelled {t.label('pseudonym')!r} (run `biogate migrate`)")
            with t.lock:
                self._pseudonym = bytes(key.sign(_PSEUDONYM_LABEL, mechanism=t.p11.Mechanism.SHA256_HMAC))
        return self._pseudonym

    def add_key(self, cipher: str | None = None, key_id: str | None = None) -> KeyInfo:
        if cipher not in (None, _CIPHER):
            raise KeyringError(f"the PKCS#11 backend makes {_CIPHER} keys only, not {cipher}")
        new_id = key_id or new_key_id()
        if new_id in self._list(force=True):
            raise KeyringError(f"key {new_id!r} exists already")
        if self._keks and new_id < max(self._keks):
            raise KeyringError(f"key {new_id!r} would not be the primary (the token's newest id is greater)")
        self.token.new_secret("aes", self._label, new_id.encode())
        self._list(force=True)
        return self.key_info(new_id)

    def remove_key(self, key_id_: str) -> None:
        kek = self._kek(key_id_)
        if key_id_ == self.primary_key_id():
            raise KeyringError(f"key {key_id_!r} is the primary; rotate before retiring it")
        with self.token.lock:
            kek.destroy()
        self._fingerprints.pop(key_id_, None)
        self._list(force=True)


# -- the MFA's rotating decision-token keys ----------------------------------------------------


class Pkcs11KeyVault:
    """A :class:`~services.common.crypto.signing.SigningKeyVault` in the token: each key pair's
    label carries its lifecycle as JSON after the label prefix."""

    def __init__(self, token: Pkcs11Token) -> None:
        self.token = token
        self._label = token.label("mfa-jwt")
        self._lock = threading.Lock()
        self._signers: dict[str, Pkcs11Signer] = {}

    def _privates(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        C, A = self.token.p11.ObjectClass, self.token.p11.Attribute
        for obj in self.token.find(cls=C.PRIVATE_KEY):
            with self.token.lock:
                label = obj[A.LABEL]
            if label.startswith(self._label + " "):
                yield obj, json.loads(label[len(self._label) + 1:])

    def entries(self) -> list[dict[str, Any]]:
        saved = [meta for _, meta in self._privates() if meta.get("created") is not None]  # not mid-rotation
        return sorted(saved, key=lambda m: (m["created"], m["kid"]))

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            yield

    def save(self, entries: list[dict[str, Any]]) -> None:
        wanted = {e["kid"]: e for e in entries}
        A = self.token.p11.Attribute
        for obj, meta in self._privates():
            entry = wanted.get(meta["kid"])
            if entry is not None and entry != meta:
                with self.token.lock:
                    obj[A.LABEL] = self._label + " " + json.dumps(entry, sort_keys=True)

    def generate(self) -> dict[str, Any]:
        pending = self.token.label("mfa-jwt-pending")
        public, private = self.token.new_ed25519(pending, secrets.token_bytes(8))
        kid = jwt_kid(self.token.public_key(public))
        entry = {"kid": kid, "created": None, "retired": None}
        A = self.token.p11.Attribute
        with self.token.lock:
            for obj in (public, private):
                obj[A.ID] = kid.encode()
            private[A.LABEL] = self._label + " " + json.dumps(entry, sort_keys=True)
        return entry

    def signer(self, entry: dict[str, Any]) -> Pkcs11Signer:
        kid = entry["kid"]
        hit = self._signers.get(kid)
        if hit is None:
            C = self.token.p11.ObjectClass
            private = self.token.find(key_id=kid.encode(), cls=C.PRIVATE_KEY)
            public = self.token.find(key_id=kid.encode(), cls=C.PUBLIC_KEY)
            if not private or not public:
                raise KeyringError(f"token key {kid!r} is gone")
            hit = self._signers[kid] = Pkcs11Signer(self.token, private[0], self.token.public_key(public[0]), kid)
        return hit

    def destroy(self, entry: dict[str, Any]) -> None:
        self._signers.pop(entry["kid"], None)
        self.token.destroy_pair(entry["kid"].encode())
