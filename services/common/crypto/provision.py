"""Every key a deployment makes, made in one place and audited.

The keys live in files or a token, the audit trail in the database: no transaction spans both, so
a key is audited *before* it exists where it can be. :func:`audited` commits ``keys.adding`` (what
is about to be made: the kind of key, its id where it is chosen beforehand, cipher or algorithm,
purpose), then makes it, then writes ``keys.added`` (with the id it got), or ``keys.add_failed``
(with the error's class) when making it failed. A process that dies in between leaves
``keys.adding`` without its outcome: the trail may name a key that was never made, never a key it
does not name. Records carry ``key`` (``kek``, ``pseudonym``, ``audit-signing``,
``mfa-token-signing``), ids, ciphers or algorithms, the backend and the actor (``cli:<user>``,
``service:<name>``); never key material.

The one exception is the audit signing key itself: nothing can be signed before it exists. It is
made first, and the first record it signs is its own ``keys.added`` (``key_id`` is the id the
head and checkpoints of that record are signed under). A process that dies between making it and
writing that record leaves a key no record names; it is still the key every later record names
as its signer, and ``audit verify`` is run with it.

:func:`ensure_keys` is what a first start (``Runtime.open``), ``biogate migrate`` and ``biogate
keys init`` call; it makes, in this order, whatever is missing: the audit signing key, the keyring
(its first KEK; the file keyring's pseudonym key in the same write), the token's pseudonym key.
The MFA's decision-token keys (services/mfa/tokens.py) are made through :func:`audited` too.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import KeyCreatedElsewhereError, NoKeyError, NoKeyringError
from .keyring import KeyInfo, Keyring, keyring_backend, new_key_id, open_keyring

if TYPE_CHECKING:
    from services.common.audit import AuditLog
    from services.common.config import CommonSettings
    from services.common.crypto.signing import Signer
    from services.common.storage.interfaces import Storage

log = logging.getLogger(__name__)

KeyAudit = Callable[[str, dict[str, Any]], None]  # (event type, details): writes one audit record
T = TypeVar("T")


def audited(
    audit: KeyAudit | None,
    planned: list[dict[str, Any]],
    create: Callable[[], T],
    made: Callable[[T], list[dict[str, Any]]],
) -> T:
    """``create()`` makes one or more keys (one write may make two: the file keyring's first KEK and
    its pseudonym key): ``keys.adding`` for each of ``planned`` first, then ``keys.added`` for each
    of ``made(result)``, or ``keys.add_failed`` for each of ``planned``."""
    if audit is not None:
        for details in planned:
            audit("keys.adding", details)
    try:
        result = create()
    except BaseException as exc:
        for details in planned:
            audit_failure(audit, "keys.add_failed", details, exc)
        raise
    if audit is not None:
        for details in made(result):
            audit("keys.added", details)
    return result


def audit_failure(audit: KeyAudit | None, event: str, details: dict[str, Any], exc: BaseException) -> None:
    """Record an aborted step; a record that cannot be written must not hide the error itself."""
    if audit is None:
        return
    try:
        audit(event, {**details, "error": type(exc).__name__})
    except Exception as audit_exc:  # noqa: BLE001 - logged, the original error is raised
        log.error("cannot write the audit record %s (%s) after %s", event, type(audit_exc).__name__, type(exc).__name__)


def add_kek(audit: KeyAudit | None, purpose: str, cipher: str | None, create: Callable[[str], KeyInfo]) -> KeyInfo:
    """``create(key_id)`` makes the new primary KEK under the id the trail names first."""
    key_id = new_key_id()
    planned = {"key": "kek", "key_id": key_id, "cipher": cipher, "purpose": purpose}
    return audited(audit, [planned], lambda: create(key_id),
                   lambda info: [{**planned, "key_id": info.key_id, "cipher": info.cipher}])


def key_audit(log: AuditLog, settings: CommonSettings, actor: str) -> KeyAudit:
    """A function writing one key record to ``log`` as ``actor``, naming the configured backend."""
    backend = keyring_backend(settings)

    def audit(event: str, details: dict[str, Any]) -> None:
        log.append(event, actor=actor, tenant_id=None, details={**details, "backend": backend})

    return audit


def operations_audit(settings: CommonSettings, storage: Storage, actor: str) -> KeyAudit:
    """The key-operation audit of a process that holds no runtime (the CLI): usable before the
    keyring exists; makes the audit signing key (audited) if there is none."""
    from services.common.audit import AuditLog

    signer, made = _audit_signer(settings)
    audit = key_audit(AuditLog.for_operations(settings, storage, signer), settings, actor)
    if made:
        audit("keys.added", {"key": "audit-signing", "key_id": signer.key_id, "algorithm": signer.algorithm,
                             "purpose": "init"})
    return audit


def _audit_signer(settings: CommonSettings) -> tuple[Signer, bool]:
    """The audit signing key, made when there is none; -> (signer, made by this call)."""
    from .backend import create_audit_signer, open_audit_signer

    try:
        return open_audit_signer(settings, create=False), False
    except NoKeyError:
        pass
    try:
        return create_audit_signer(settings), True
    except KeyCreatedElsewhereError:  # another process made it first: theirs to audit
        return open_audit_signer(settings, create=False), False


def create_keyring(settings: CommonSettings, audit: KeyAudit | None) -> Keyring:
    """Create the configured keyring (the file with its pseudonym key, or the token's first KEK),
    audited; KeyCreatedElsewhereError (audited as failed) when another process created it meanwhile."""
    file_backend = keyring_backend(settings) == "file"
    key_id = new_key_id()
    kek = {"key": "kek", "key_id": key_id, "cipher": settings.keys.cipher, "purpose": "init"}
    planned = [kek] + ([{"key": "pseudonym", "purpose": "init"}] if file_backend else [])

    def create() -> Keyring:
        keyring = open_keyring(settings, create=True, first_key_id=key_id)
        if keyring.primary_key_id() != key_id:
            raise KeyCreatedElsewhereError("another process created the keyring meanwhile; nothing was added")
        return keyring

    def made(keyring: Keyring) -> list[dict[str, Any]]:
        return [{**kek, "cipher": keyring.key_info(key_id).cipher}, *planned[1:]]

    return audited(audit, planned, create, made)


def ensure_keyring(settings: CommonSettings, audit: KeyAudit | None) -> tuple[Keyring, bool]:
    """The configured keyring, created (audited) if there is none; -> (keyring, created by this call)."""
    try:
        return open_keyring(settings, create=False), False
    except NoKeyringError:
        pass
    try:
        return create_keyring(settings, audit), True
    except KeyCreatedElsewhereError:  # a replica starting at the same time won; its key is audited
        return open_keyring(settings, create=False), False


def _ensure_pseudonym_key(keyring: Keyring, audit: KeyAudit | None) -> None:
    """The token's pseudonym key is an object of its own (the file keyring's was made with it)."""
    from .hsm import Pkcs11Keyring

    if not isinstance(keyring, Pkcs11Keyring) or keyring.pseudonym_key_id() is not None:
        return
    key_id = secrets.token_hex(8)
    planned = {"key": "pseudonym", "key_id": key_id, "algorithm": "HMAC-SHA256", "purpose": "init"}
    audited(audit, [planned], lambda: keyring.create_pseudonym_key(key_id), lambda _: [planned])


def ensure_keys(settings: CommonSettings, storage: Storage, actor: str) -> tuple[Keyring, bool]:
    """The audit signing key, the keyring and the pseudonym key, each made (audited, as ``actor``)
    when missing: what a first start, `biogate migrate` and `biogate keys init` share; -> (keyring,
    whether this call created it)."""
    audit = operations_audit(settings, storage, actor)
    keyring, created = ensure_keyring(settings, audit)
    _ensure_pseudonym_key(keyring, audit)
    return keyring, created


__all__ = ["KeyAudit", "add_kek", "audit_failure", "audited", "create_keyring",
           "ensure_keyring", "ensure_keys", "key_audit", "operations_audit"]
