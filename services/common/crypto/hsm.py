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
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.common import metrics

from .errors import (
    KeyCreatedElsewhereError,
    KeyringError,
    NoKeyError,
    NoKeyringError,
    TokenKeyInvalidError,
    TokenUnavailableError,
    UnknownKeyError,
    WrongKeyError,
)
from .keyring import KeyInfo, new_key_id
from .signing import PublicKey, algorithm_of, jwt_kid, key_id

if TYPE_CHECKING:
    from services.common.config import Pkcs11Config

log = logging.getLogger(__name__)
T = TypeVar("T")

_ED25519_OID = "1.3.101.112"
_KCV_MESSAGE = b"biogate-kek-check-v1"
_SIGNING_CHECK = b"biogate-signing-check-v1"
_PSEUDONYM_LABEL = b"biogate-pseudonym-key-v1"
_CIPHER = "AES-256-GCM"
_NONCE = 12
_LIST_TTL_S = 1.0  # how long a listing of the token's keys serves lookups of known ids (not the primary)


def _pkcs11():
    import pkcs11

    return pkcs11


_libs: dict[str, Any] = {}
_epochs: dict[str, int] = {}  # by module: how often this process initialised the library again
_tokens: dict[tuple[str, str, str], Pkcs11Token] = {}
_tokens_lock = threading.Lock()
# Errors that mean the session itself is gone, not the operation refused: the HSM restarted or
# failed over, the network to it broke, the token was reset (its login lost with it).
_SESSION_LOST = ("SessionHandleInvalid", "SessionClosed", "DeviceRemoved", "DeviceError", "TokenNotPresent",
                 "TokenNotRecognised", "UserNotLoggedIn")
_RECONNECT_TRIES = 3


def _device_faults(E: Any) -> tuple[type[Exception], ...]:
    """Errors by which a token that answers says it failed an operation, whatever its inputs."""
    return (E.DeviceMemory, E.HostMemory, E.FunctionFailed, E.FunctionCancelled)


def _key_faults(E: Any) -> tuple[type[Exception], ...]:
    """Errors by which a token that answers refuses a key for an operation it was made for: its type
    or size is not that of the key BioGate made (the object replaced or edited)."""
    return (E.KeyTypeInconsistent, E.KeySizeRange, E.KeyIndigestible)


def _key_failed(cfg: Pkcs11Config, kind: str, key: str, why: str) -> TokenKeyInvalidError:
    """A key of the token that answers fails (counted by ``kind``, logged): never retryable."""
    metrics.PKCS11_KEY_FAILURES.labels(kind).inc()
    message = (f"the {key} in the PKCS#11 token {cfg.token_label!r} fails: {why}; the token answers, so retrying "
               "does not help: check the key's object in the HSM (restore it from the HSM's backup)")
    log.error("PKCS#11 token %r: %s", cfg.token_label, message)
    return TokenKeyInvalidError(message)


def _denied(obj: Any, uses: tuple[str, ...]) -> str:
    """"" when the object's attributes allow each of ``uses`` ("encrypt", "decrypt", "sign"), else
    which they do not (python-pkcs11 gives an object only the methods its attributes allow)."""
    import pkcs11.types as types

    mixins = {"encrypt": types.EncryptMixin, "decrypt": types.DecryptMixin, "sign": types.SignMixin}
    denied = [use for use in uses if not isinstance(obj, mixins[use])]
    return f"its attributes do not allow it to {', '.join(denied)}" if denied else ""


def _probed(E: Any, probe: Callable[[], object], faulty: Callable[[Exception], TokenUnavailableError]) -> str:
    """After a GeneralError from an operation no input makes fail, which a failing key and a device's
    passing fault both give: "" when ``probe`` (the operation with the same key on fixed input)
    succeeds, so the failure was the device's, else what the probe raised (the key's). A device's
    fault in the probe is raised as ``faulty(exc)``."""
    try:
        probe()
    except _device_faults(E) as exc:
        raise faulty(exc) from None
    except E.PKCS11Error as exc:
        return type(exc).__name__
    return ""


def _faulty(cfg: Pkcs11Config, why: str) -> TokenUnavailableError:
    """The token failed an operation (a device's fault, not the key's): retryable."""
    return TokenUnavailableError(
        f"the PKCS#11 token {cfg.token_label!r} failed: {why}; an HSM fault, not the data: check the HSM (its "
        "logs, its key storage); calls are refused until it works, no restart needed", cfg.reconnect_interval_s)


def open_token(cfg: Pkcs11Config) -> Pkcs11Token:
    """The process's logged-in session on the configured token (one per token)."""
    key = (str(cfg.module), cfg.token_label, cfg.label_prefix)
    with _tokens_lock:
        token = _tokens.get(key)
        if token is None or token.closed:
            token = _tokens[key] = Pkcs11Token(cfg)
        return token


def _unreachable(cfg: Pkcs11Config, why: str) -> str:
    return (f"the PKCS#11 token {cfg.token_label!r} is unreachable: {why}; check the HSM and the network to "
            f"it (keys.pkcs11.module {cfg.module}); calls are refused until it answers, no restart needed")


def _reinitialize(module: str) -> None:
    """Initialise the library again: SoftHSM lists its tokens only then (a list read while another
    process wrote the token's files, or while the token was away, stays wrong until then). It ends
    every session of this process; each token opens its own again at its next use (the epoch)."""
    with suppress(Exception):  # failing, the next login attempt says why
        _libs[module].reinitialize()
    _epochs[module] = _epochs.get(module, 0) + 1


class _SessionLost(TokenUnavailableError):
    """The session went away under an operation (which did not happen); the next use reconnects."""


class Pkcs11Token:
    """One read-write user session on the token, shared by the keyring and the signers. Each
    operation holds the session (:meth:`using`): PKCS#11 allows one operation at a time per session.

    When the session is lost (an HSM restart or failover, a token reset) the next use logs in
    again, once for every caller waiting (they wait on the lock), with a few tries; object handles
    are per session, so holders of handles look them up again when :attr:`generation` changed.
    While the token stays unreachable every use raises :class:`TokenUnavailableError`, at once for
    ``keys.pkcs11.reconnect_interval_s`` after a failed reconnect."""

    def __init__(self, cfg: Pkcs11Config) -> None:
        p11 = _pkcs11()
        pin = os.environ.get(cfg.pin_env)
        if not pin:
            raise KeyringError(f"keys.pkcs11.pin_env: set the environment variable {cfg.pin_env} to the token's user PIN")
        module = str(cfg.module)
        try:
            if module not in _libs:
                _libs[module] = p11.lib(module)
        except (RuntimeError, OSError) as exc:
            raise KeyringError(f"keys.pkcs11.module {module}: cannot load the PKCS#11 library ({exc})") from None
        self.cfg, self.module = cfg, module
        self.p11 = p11
        self.prefix = cfg.label_prefix
        self.lock = threading.RLock()
        self.closed = False
        self.generation = 0  # bumped with every new session: handles of an older one are never used
        self._depth = 0  # nested uses of the session by this thread (the lock is reentrant)
        self._lost = False
        self._down_until = 0.0
        self._down_message = ""
        self._lost_errors = tuple(getattr(p11.exceptions, name) for name in _SESSION_LOST)
        self._epoch = _epochs.get(module, 0)
        self.session = self._transient(self._login, cfg, lambda: _reinitialize(module))

    def _login(self) -> Any:
        self._epoch = _epochs.get(self.module, 0)
        return self._open(_libs[self.module].get_token(token_label=self.cfg.token_label),
                          os.environ.get(self.cfg.pin_env, ""), self.cfg)

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
    def _transient(step: Callable[[], Any], cfg: Pkcs11Config, between: Callable[[], None], tries: int = 5,
                   unreachable: bool = False) -> Any:
        """``step()``, with transient token errors retried a few times, then reported by name: a
        network HSM's hiccup, or SoftHSM reading its files while another process writes them, which
        fails finding the token (GeneralError, even NoSuchToken) as well as opening a session.
        ``unreachable``: reconnecting a token that was working, reported as TokenUnavailableError."""
        E = _pkcs11().exceptions
        for attempt in range(tries):
            try:
                return step()
            except E.PKCS11Error as exc:
                if attempt + 1 < tries:
                    time.sleep(0.1 * 2**attempt)
                    between()
                elif unreachable:
                    raise TokenUnavailableError(_unreachable(cfg, f"{type(exc).__name__} after {tries} tries"),
                                                cfg.reconnect_interval_s) from None
                elif isinstance(exc, (E.NoSuchToken, E.MultipleTokensReturned)):
                    raise KeyringError(f"keys.pkcs11.token_label: no single token labelled {cfg.token_label!r} "
                                       f"in {cfg.module}") from None
                else:
                    raise KeyringError(f"token {cfg.token_label!r}: cannot open a session "
                                       f"({type(exc).__name__} {exc})") from None
        raise AssertionError("unreachable")

    @contextmanager
    def using(self) -> Iterator[None]:
        """Holds the session for one operation, logging in again first when it was lost. An error
        that shows the session gone is raised as :class:`TokenUnavailableError` (see :meth:`run`)."""
        with self.lock:
            if not self._depth and (self._lost or self._epoch != _epochs.get(self.module, 0)):
                self._reconnect()
            generation = self.generation
            self._depth += 1
            try:
                yield
            except self._lost_errors as exc:
                if generation == self.generation:
                    self._lost = True
                raise _SessionLost(_unreachable(self.cfg, f"the session was lost ({type(exc).__name__})"),
                                   self.cfg.reconnect_interval_s) from None
            finally:
                self._depth -= 1

    def run(self, op: Callable[[], T]) -> T:
        """``op()`` holding the session; once more after a reconnect when the session was lost under
        it. Only for operations that may run twice (find, sign, encrypt, decrypt with the same
        inputs), and that look their handles up by :attr:`generation`: creating or destroying
        objects is not retried (whether it happened is unknown), its caller gets the error."""
        with self.lock:
            retry = not self._depth  # an operation inside another: the outer one retries, afresh
            try:
                with self.using():
                    return op()
            except _SessionLost:
                if not retry:
                    raise
            with self.using():
                return op()

    @contextmanager
    def same_session(self) -> Iterator[None]:
        """Holds the session for an operation that looks objects up and then changes or destroys
        them: handles are per session, and one looked up before a reconnect names another object of
        the new session (measured on SoftHSM2: a destruction took another key). A session lost
        before the block is logged in again first (a search tells); an error in it is not retried
        (whether a change under a lost session happened is unknown): the caller runs it again."""
        with self.lock:
            self.find(label=self.label("reachable"))
            with self.using():
                yield

    def check(self) -> str:
        """"" while the token answers (a search, reconnecting a lost session), else why it does not."""
        try:
            self.find(label=self.label("reachable"))
        except TokenUnavailableError as exc:
            return str(exc)
        except self.p11.exceptions.PKCS11Error as exc:  # answering, but not as it should
            return _unreachable(self.cfg, type(exc).__name__)
        return ""

    def _reconnect(self) -> None:
        """Log in again (the caller holds the lock); TokenUnavailableError when the token does not answer."""
        if time.monotonic() < self._down_until:
            raise TokenUnavailableError(self._down_message, self.cfg.reconnect_interval_s)
        # The old session is gone (not closed: after a restart its handle may be another session's).
        self.generation += 1
        self._lost = True
        try:
            self.session = self._transient(self._login, self.cfg, lambda: _reinitialize(self.module),
                                           _RECONNECT_TRIES, unreachable=True)
        except KeyringError as exc:  # no session; the PIN refused (named by its variable, never shown)
            message = str(exc) if isinstance(exc, TokenUnavailableError) else _unreachable(self.cfg, str(exc))
            self._down_until = time.monotonic() + self.cfg.reconnect_interval_s
            self._down_message = message
            metrics.PKCS11_RECONNECTS.labels("failed").inc()
            log.error("PKCS#11 token %r: reconnecting failed: %s", self.cfg.token_label, message)
            raise TokenUnavailableError(message, self.cfg.reconnect_interval_s) from None
        self._lost = False
        self._down_until = 0.0
        metrics.PKCS11_RECONNECTS.labels("ok").inc()
        log.warning("PKCS#11 token %r: the session was lost and is open again", self.cfg.token_label)

    def label(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def find(self, label: str | None = None, cls: Any = None, key_id: bytes | None = None) -> list[Any]:
        A = self.p11.Attribute
        template: dict[Any, Any] = {}
        for attr, value in ((A.LABEL, label), (A.CLASS, cls), (A.ID, key_id)):
            if value is not None:
                template[attr] = value
        return self.run(lambda: list(self.session.get_objects(template)))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self._lost or self._epoch != _epochs.get(self.module, 0):
                return  # gone already; after a restart its handle may be another session's
            with suppress(self.p11.exceptions.PKCS11Error):
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
            with self.using():
                return self.session.generate_key(p11.KeyType.AES, 256, store=True, label=label, template=template)
        template.update({A.SIGN: True, A.VERIFY: False, A.ENCRYPT: False, A.DECRYPT: False})
        with self.using():
            return self.session.generate_key(p11.KeyType.GENERIC_SECRET, 256, store=True, label=label,
                                             template=template)

    def new_ed25519(self, label: str, key_id: bytes) -> tuple[Any, Any]:
        p11, A = self.p11, self.p11.Attribute
        from pkcs11.util.ec import encode_named_curve_parameters

        with self.using():
            params = self.session.create_domain_parameters(
                p11.KeyType.EC_EDWARDS, {A.EC_PARAMS: encode_named_curve_parameters(_ED25519_OID)}, local=True)
            public, private = params.generate_keypair(
                mechanism=p11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN, store=True, label=label, id=key_id,
                public_template={A.TOKEN: True, A.VERIFY: True},
                private_template={**self._private(), A.SIGN: True})
        return public, private

    def public_key(self, public_obj: Any) -> PublicKey:
        from asn1crypto.core import OctetString

        with self.using():
            point = public_obj[self.p11.Attribute.EC_POINT]
        return Ed25519PublicKey.from_public_bytes(OctetString.load(point).native)

    def destroy_pair(self, key_id: bytes) -> None:
        with self.same_session():
            for obj in self.find(key_id=key_id):
                obj.destroy()

    def first(self, label: str, cls: Any) -> Any | None:
        """Of the objects labelled ``label`` of class ``cls``, the one with the lowest CKA_ID (the one
        every process takes where several were made at once), or None. Its handle names that object
        only in the session that found it: call it inside :meth:`run` or :meth:`same_session`, and
        let no handle out (:meth:`first_id` reads the id)."""
        A = self.p11.Attribute
        with self.using():
            return min(self.find(label=label, cls=cls), key=lambda o: bytes(o[A.ID]), default=None)

    def first_id(self, label: str, cls: Any) -> bytes | None:
        """The CKA_ID of :meth:`first`, read in the session that found it."""
        A = self.p11.Attribute
        return self.run(lambda: None if (found := self.first(label, cls)) is None else bytes(found[A.ID]))


class Pkcs11Signer:
    """A :class:`~services.common.crypto.signing.Signer` whose private key is in the token, named by
    its CKA_ID: its handle is looked up in the session each signature runs in, never taken from
    the caller (a handle looked up in an earlier call may name another object after a reconnect)."""

    def __init__(self, token: Pkcs11Token, object_id: bytes, public_key: PublicKey, kid: str | None = None) -> None:
        self._token, self._object_id = token, object_id
        self._key: Any = None
        self._generation = -1
        self.public_key = public_key
        self.algorithm = algorithm_of(public_key)
        self.key_id = kid or key_id(public_key)

    def _private(self) -> Any:
        """The private key's handle in the token's current session (looked up by its CKA_ID)."""
        if self._key is None or self._generation != self._token.generation:
            found = self._token.find(key_id=self._object_id, cls=self._token.p11.ObjectClass.PRIVATE_KEY)
            if not found:
                raise KeyringError(f"token key {self.key_id!r} is gone")
            self._key, self._generation = found[0], self._token.generation
        return self._key

    def sign(self, message: bytes) -> bytes:
        E = self._token.p11.exceptions
        try:
            return self._signed(message)
        except E.GeneralError:  # no message makes signing fail: the key's, or the device's passing fault
            fault = _probed(E, lambda: self._signed(_SIGNING_CHECK), lambda exc: self._faulty("a test signature", exc))
        except _key_faults(E) as exc:
            raise self._invalid(f"signing ({type(exc).__name__})") from None
        except _device_faults(E) as exc:
            raise self._faulty("signing", exc) from None
        if fault:
            raise self._invalid(f"signing (GeneralError), and a test signature too ({fault})")
        raise _faulty(self._token.cfg, f"signing with key {self.key_id!r} (GeneralError; a test signature with "
                                       "it passed)")

    def _signed(self, message: bytes) -> bytes:
        eddsa = self._token.p11.Mechanism.EDDSA
        return self._token.run(lambda: bytes(self._usable().sign(message, mechanism=eddsa)))

    def _faulty(self, what: str, exc: Exception) -> TokenUnavailableError:
        return _faulty(self._token.cfg, f"{what} with key {self.key_id!r} ({type(exc).__name__})")

    def _usable(self) -> Any:
        key = self._private()
        denied = _denied(key, ("sign",))
        if denied:
            raise self._invalid(f"signing ({denied})")
        return key

    def _invalid(self, why: str) -> TokenKeyInvalidError:
        return _key_failed(self._token.cfg, "signing", f"signing key {self.key_id!r} (object id "
                                                       f"{self._object_id.hex()})", why)

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self.key_id})"


def _pair(token: Pkcs11Token, label: str, create: bool) -> tuple[bytes, PublicKey]:
    """The private key's CKA_ID and the public key of the single-instance key pair labelled ``label``."""
    C = token.p11.ObjectClass

    def read() -> tuple[bytes, PublicKey] | None:
        private_id = token.first_id(label, C.PRIVATE_KEY)
        return None if private_id is None else (private_id, _public_of(token, private_id, label))

    found = token.run(read)
    if found is None:
        if not create:
            raise NoKeyError(f"token has no key labelled {label!r} (run `biogate migrate`)")
        token.new_ed25519(label, secrets.token_bytes(8))
        found = token.run(read)
        if found is None:
            raise KeyringError(f"token did not keep the key labelled {label!r} it was asked to create")
    return found


def _public_of(token: Pkcs11Token, object_id: bytes, what: str) -> PublicKey:
    """The public key of the pair ``object_id`` (inside the session of the caller's lookup)."""
    public = token.find(key_id=object_id, cls=token.p11.ObjectClass.PUBLIC_KEY)
    if not public:
        raise KeyringError(f"token key {what!r} has no public key object")
    return token.public_key(public[0])


def audit_signer(token: Pkcs11Token, create: bool = True, which: str = "audit") -> Pkcs11Signer:
    """The audit signing key (``which``: ``audit``, or ``audit-next``, the key `biogate audit
    new-key` made and `biogate audit switch-key` makes the audit key)."""
    return Pkcs11Signer(token, *_pair(token, token.label(which), create))


def create_audit_signer(token: Pkcs11Token, which: str = "audit") -> Pkcs11Signer:
    """Make the audit key pair (or the next one); KeyCreatedElsewhereError when the token holds one already."""
    label = token.label(which)
    if token.find(label=label, cls=token.p11.ObjectClass.PRIVATE_KEY):
        raise KeyCreatedElsewhereError(f"token holds a key labelled {label!r} already")
    mine = secrets.token_bytes(8)
    token.new_ed25519(label, mine)
    signer = audit_signer(token, create=False, which=which)
    if signer._object_id != mine:  # another process made one at the same moment; every process signs with the first
        token.destroy_pair(mine)
        raise KeyCreatedElsewhereError(f"another process made the key labelled {label!r} meanwhile")
    return signer


def switch_audit_signer(token: Pkcs11Token, to: str | None = None) -> None:
    """Make the next audit key (``to``, its key id, else the one labelled ``audit-next``) the audit
    key: relabel its objects ``audit``, then the old key's ``audit-retired`` (kept: processes started
    before sign with it until they restart). In between both are labelled ``audit`` and a process
    starting then takes either: both are trusted. Each pair's public object is relabelled before its
    private one, so a switch interrupted anywhere leaves the next key's private object labelled
    ``audit-next`` (a run again switches) or two private keys labelled ``audit``: then ``to``, the key
    the trail introduced by the other (:func:`audit_signers`), finishes the switch."""
    C = token.p11.ObjectClass
    with token.same_session():
        if to is None:
            new_id = token.first_id(token.label("audit-next"), C.PRIVATE_KEY)
        else:
            found = _private_of(token, "audit-next", to) or _private_of(token, "audit", to)
            new_id = None if found is None else _object_id(token, found)
        if new_id is None:
            which = f"key {to} labelled {token.label('audit-next')!r} or {token.label('audit')!r}" if to else \
                f"key labelled {token.label('audit-next')!r}"
            raise NoKeyError(f"token has no {which} (run `biogate audit new-key`)")
        old_ids = {_object_id(token, o) for o in token.find(label=token.label("audit"))} - {new_id}
        _relabel(token, "audit-next", new_id, "audit")
        for old_id in sorted(old_ids):
            _relabel(token, "audit", old_id, "audit-retired")


def audit_signers(token: Pkcs11Token) -> list[Pkcs11Signer]:
    """Every key whose private object is labelled ``audit``: one, or two after a switch interrupted
    midway (:func:`switch_audit_signer`)."""
    C, A = token.p11.ObjectClass, token.p11.Attribute

    def read() -> list[tuple[bytes, PublicKey]]:
        ids = sorted(bytes(o[A.ID]) for o in token.find(label=token.label("audit"), cls=C.PRIVATE_KEY))
        return [(i, _public_of(token, i, token.label("audit"))) for i in ids]

    return [Pkcs11Signer(token, i, public) for i, public in token.run(read)]


def retired_audit_key(token: Pkcs11Token, key_id_: str) -> Any | None:
    """The private object of the retired audit key ``key_id_`` (labelled ``audit-retired``), or None;
    a handle of the caller's session (:meth:`Pkcs11Token.same_session`)."""
    return _private_of(token, "audit-retired", key_id_)


def has_retired_audit_key(token: Pkcs11Token, key_id_: str) -> bool:
    return token.run(lambda: retired_audit_key(token, key_id_) is not None)


def _private_of(token: Pkcs11Token, which: str, key_id_: str) -> Any | None:
    """The private object labelled ``which`` whose public key is ``key_id_``, or None (a handle of
    the caller's session)."""
    C = token.p11.ObjectClass
    for private in token.find(label=token.label(which), cls=C.PRIVATE_KEY):
        public = token.find(key_id=_object_id(token, private), cls=C.PUBLIC_KEY)
        if public and key_id(token.public_key(public[0])) == key_id_:
            return private
    return None


def destroy_retired_audit_key(token: Pkcs11Token, key_id_: str) -> None:
    """Destroy the retired audit key's private object. Its public object stays: it signs nothing,
    and shows an operator listing the token which key the trail's older signatures are under."""
    with token.same_session():
        private = retired_audit_key(token, key_id_)
        if private is None:
            raise NoKeyError(f"token has no private key {key_id_} labelled {token.label('audit-retired')!r}")
        private.destroy()


def _object_id(token: Pkcs11Token, obj: Any) -> bytes:
    with token.using():
        return bytes(obj[token.p11.Attribute.ID])


def _relabel(token: Pkcs11Token, what: str, object_id: bytes, to: str) -> None:
    """Relabel the objects ``what`` with ``object_id`` as ``to``: the public key, then the private
    key (processes look the private one up by label: it moves last)."""
    C = token.p11.ObjectClass
    for cls in (C.PUBLIC_KEY, C.PRIVATE_KEY):
        for obj in token.find(label=token.label(what), key_id=object_id, cls=cls):
            _set_label(token, obj, token.label(to))


def _set_label(token: Pkcs11Token, obj: Any, label: str) -> None:
    """One write to the token (apart, so that tests interrupt a switch between any two)."""
    with token.using():
        obj[token.p11.Attribute.LABEL] = label


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
        self._generation = token.generation
        self._fingerprints: dict[str, bytes] = {}
        self._pseudonym: bytes | None = None
        if not self._list(force=True):
            if not create:
                raise NoKeyringError(f"token has no {self._label!r} key-encryption key (run `biogate keys init`)")
            self.add_key(key_id=first_key_id)

    def _list(self, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if force or now - self._listed_at > _LIST_TTL_S or self._generation != self.token.generation:
            C, A = self.token.p11.ObjectClass, self.token.p11.Attribute

            def listing() -> tuple[dict[str, Any], int]:
                objects = self.token.find(label=self._label, cls=C.SECRET_KEY)
                return {bytes(o[A.ID]).decode(): o for o in objects}, self.token.generation

            self._keks, self._generation = self.token.run(listing)
            self._listed_at = now
        return self._keks

    def _kek(self, key_id_: str) -> Any:
        kek = self._list().get(key_id_) or self._list(force=True).get(key_id_)
        if kek is None:
            raise UnknownKeyError(key_id_)
        return kek

    def _with_kek(self, key_id_: str, what: str, use: Callable[[Any], bytes]) -> bytes:
        """``use(kek)`` under the token's lock; once more after a fresh listing when the handle went
        stale (another process or keyring instance retired or re-created keys). A key that is not
        the one BioGate made (its attributes not allowing it to encrypt, decrypt and sign, or the
        token refusing its type or size) is TokenKeyInvalidError."""
        E = self.token.p11.exceptions
        for attempt in (0, 1):
            try:
                return self.token.run(lambda: bytes(use(self._usable(key_id_, what))))
            except E.ObjectHandleInvalid:
                if attempt:
                    raise
                self._list(force=True)
            except _key_faults(E) as exc:
                raise self._invalid(key_id_, f"{what} ({type(exc).__name__})") from None
        raise AssertionError("unreachable")

    def _usable(self, key_id_: str, what: str) -> Any:
        kek = self._kek(key_id_)
        denied = _denied(kek, ("encrypt", "decrypt", "sign"))
        if denied:
            raise self._invalid(key_id_, f"{what} ({denied})")
        return kek

    def _invalid(self, key_id_: str, why: str) -> TokenKeyInvalidError:
        return _key_failed(self.token.cfg, "kek", f"key-encryption key {key_id_!r} (label {self._label!r})", why)

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
            what = "computing its check value"
            fp = self._fingerprints[key_id_] = self._answered(key_id_, what, lambda: self._with_kek(
                key_id_, what, lambda k: k.sign(_KCV_MESSAGE, mechanism=cmac)))[:8]
        return fp

    def keys(self) -> list[KeyInfo]:
        return [self.key_info(k) for k in sorted(self._list())]

    def key_info(self, key_id_: str) -> KeyInfo:
        self._kek(key_id_)
        return KeyInfo(key_id_, _CIPHER, _created_of(key_id_), key_id_ == self._primary(self._list()),
                       self._fingerprint(key_id_))

    def wrap(self, key_id_: str, data_key: bytes, aad: bytes) -> bytes:
        return self._answered(key_id_, "encrypting", lambda: self._encrypt(key_id_, data_key, aad))

    def _answered(self, key_id_: str, what: str, op: Callable[[], bytes]) -> bytes:
        """``op()``, an operation under the key that no input makes fail (encrypting, the check
        value), with the token's failures told apart: GeneralError is the key's, never retryable,
        when a test encryption with it fails too, else the device's passing fault; a device's fault
        is the token's (TokenUnavailableError)."""
        E = self.token.p11.exceptions
        try:
            return op()
        except E.GeneralError:
            fault = self._kek_fault(key_id_)
        except _device_faults(E) as exc:
            raise self._device_fault(key_id_, what, exc) from None
        if fault:
            raise self._invalid(key_id_, f"{what} (GeneralError), and a test encryption too ({fault})")
        raise _faulty(self.token.cfg, f"{what} under key {key_id_!r} (GeneralError; a test encryption with it passed)")

    def _encrypt(self, key_id_: str, data_key: bytes, aad: bytes) -> bytes:
        """``data_key`` sealed in the token (PKCS#11 errors as the token raised them)."""
        from pkcs11.mechanisms import GCMParams

        nonce = secrets.token_bytes(_NONCE)
        gcm = self.token.p11.Mechanism.AES_GCM
        return nonce + self._with_kek(key_id_, "encrypting", lambda k: k.encrypt(
            data_key, mechanism=gcm, mechanism_param=GCMParams(nonce, aad, 128)))

    def unwrap(self, key_id_: str, wrapped: bytes, aad: bytes) -> bytes:

        if len(wrapped) <= _NONCE + 16:
            self._kek(key_id_)
            raise WrongKeyError(f"the wrapped data key is too short for key {key_id_!r}")
        E = self.token.p11.exceptions
        try:
            return self._decrypt(key_id_, wrapped, aad)
        except (E.EncryptedDataInvalid, E.EncryptedDataLenRange):
            raise WrongKeyError(f"the data key does not unwrap under key {key_id_!r}") from None
        except E.GeneralError:
            # SoftHSM2 (2.6.1, measured: a flipped tag, other associated data, a truncated ciphertext)
            # answers a GCM tag that does not verify with CKR_GENERAL_ERROR, as a failing device does.
            fault = self._kek_fault(key_id_)
            if fault:
                raise self._invalid(key_id_, f"unwrapping (GeneralError), and a test encryption too ({fault})") from None
            raise WrongKeyError(f"the data key does not unwrap under key {key_id_!r}") from None
        except _device_faults(E) as exc:
            raise self._device_fault(key_id_, "unwrapping", exc) from None

    def _device_fault(self, key_id_: str, what: str, exc: Exception) -> TokenUnavailableError:
        return _faulty(self.token.cfg, f"{what} under key {key_id_!r} ({type(exc).__name__})")

    def _decrypt(self, key_id_: str, wrapped: bytes, aad: bytes) -> bytes:
        """What :meth:`wrap` sealed, opened in the token (PKCS#11 errors as the token raised them)."""
        from pkcs11.mechanisms import GCMParams

        gcm = self.token.p11.Mechanism.AES_GCM
        return self._with_kek(key_id_, "unwrapping", lambda k: k.decrypt(
            wrapped[_NONCE:], mechanism=gcm, mechanism_param=GCMParams(wrapped[:_NONCE], aad, 128)))

    def _kek_fault(self, key_id_: str) -> str:
        """"" when the key wraps a test message and opens it again in the token, else what the key
        did; a device's fault (the token failing, not the key) is TokenUnavailableError."""
        back: list[bytes] = []
        fault = _probed(self.token.p11.exceptions, lambda: back.append(self._decrypt(
            key_id_, self._encrypt(key_id_, _KCV_MESSAGE, _KCV_MESSAGE), _KCV_MESSAGE)),
            lambda exc: self._device_fault(key_id_, "a test encryption", exc))
        return fault or ("" if back[0] == _KCV_MESSAGE else "it decrypted to other bytes")

    def pseudonym_key_id(self) -> str | None:
        """The token object id (hex) of the pseudonym root key, None when the token has none."""
        found = self.token.first_id(self.token.label("pseudonym"), self.token.p11.ObjectClass.SECRET_KEY)
        return None if found is None else found.hex()

    def create_pseudonym_key(self, key_id_hex: str) -> None:
        """Make the pseudonym root key under the object id ``key_id_hex`` (its creation is audited by
        services.common.crypto.provision)."""
        self.token.new_secret("hmac", self.token.label("pseudonym"), bytes.fromhex(key_id_hex))

    def pseudonym_key(self) -> bytes:
        """The pseudonym key, derived in the token once. No input makes the derivation fail: a
        refused key type is the key's (TokenKeyInvalidError), a device's fault the token's
        (TokenUnavailableError, as is a token that does not answer), and a GeneralError either: a
        second derivation tells them apart (its input is fixed, so it is its own probe, and when it
        succeeds its key is the one)."""
        if self._pseudonym is None:
            t, E = self.token, self.token.p11.exceptions
            label = t.label("pseudonym")

            def derive() -> bytes:
                key = t.first(label, t.p11.ObjectClass.SECRET_KEY)
                if key is None:  # made, audited, by services.common.crypto.provision.ensure_keys
                    raise NoKeyError(f"token has no key labelled {label!r} (run `biogate migrate`)")
                denied = _denied(key, ("sign",))
                if denied:
                    raise self._pseudonym_invalid(label, denied)
                return bytes(key.sign(_PSEUDONYM_LABEL, mechanism=t.p11.Mechanism.SHA256_HMAC))

            def faulty(exc: Exception) -> TokenUnavailableError:
                return _faulty(t.cfg, f"deriving the pseudonym key ({type(exc).__name__})")

            derived: list[bytes] = []
            try:
                self._pseudonym = t.run(derive)
            except E.GeneralError:
                fault = _probed(E, lambda: derived.append(t.run(derive)), faulty)
                if fault:
                    raise self._pseudonym_invalid(label, f"GeneralError, and a second derivation too ({fault})") from None
                log.warning("PKCS#11 token %r failed deriving the pseudonym key once (GeneralError); the second "
                            "derivation passed", t.cfg.token_label)
                self._pseudonym = derived[0]
            except _key_faults(E) as exc:
                raise self._pseudonym_invalid(label, type(exc).__name__) from None
            except _device_faults(E) as exc:
                raise faulty(exc) from None
        return self._pseudonym

    def _pseudonym_invalid(self, label: str, why: str) -> TokenKeyInvalidError:
        return _key_failed(self.token.cfg, "pseudonym", f"pseudonym root key (label {label!r})",
                           f"deriving the pseudonym key ({why})")

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
        with self.token.same_session():
            kek = self._kek(key_id_)
            if key_id_ == self.primary_key_id():
                raise KeyringError(f"key {key_id_!r} is the primary; rotate before retiring it")
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

    def _privates(self) -> list[tuple[Any, dict[str, Any]]]:
        C, A = self.token.p11.ObjectClass, self.token.p11.Attribute

        def read() -> list[tuple[Any, dict[str, Any]]]:
            labelled = [(obj, obj[A.LABEL]) for obj in self.token.find(cls=C.PRIVATE_KEY)]
            return [(obj, json.loads(label[len(self._label) + 1:])) for obj, label in labelled
                    if label.startswith(self._label + " ")]

        return self.token.run(read)

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
        with self.token.same_session():
            for obj, meta in self._privates():
                entry = wanted.get(meta["kid"])
                if entry is not None and entry != meta:
                    obj[A.LABEL] = self._label + " " + json.dumps(entry, sort_keys=True)

    def generate(self) -> dict[str, Any]:
        pending = self.token.label("mfa-jwt-pending")
        A = self.token.p11.Attribute
        with self.token.same_session():
            public, private = self.token.new_ed25519(pending, secrets.token_bytes(8))
            kid = jwt_kid(self.token.public_key(public))
            entry = {"kid": kid, "created": None, "retired": None}
            for obj in (public, private):
                obj[A.ID] = kid.encode()
            private[A.LABEL] = self._label + " " + json.dumps(entry, sort_keys=True)
        return entry

    def signer(self, entry: dict[str, Any]) -> Pkcs11Signer:
        kid = entry["kid"]
        hit = self._signers.get(kid)
        if hit is None:
            C, t = self.token.p11.ObjectClass, self.token

            def read() -> PublicKey:
                if not t.find(key_id=kid.encode(), cls=C.PRIVATE_KEY):
                    raise KeyringError(f"token key {kid!r} is gone")
                return _public_of(t, kid.encode(), kid)

            hit = self._signers[kid] = Pkcs11Signer(t, kid.encode(), t.run(read), kid)
        return hit

    def destroy(self, entry: dict[str, Any]) -> None:
        self._signers.pop(entry["kid"], None)
        self.token.destroy_pair(entry["kid"].encode())
