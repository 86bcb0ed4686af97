"""The key backend the configuration selects (``keys.backend``): which keyring, audit signer and
MFA token-key vault a process uses. ``file`` keeps them under ``data_dir`` (the embedded
default); ``pkcs11`` keeps them in the token of ``keys.pkcs11`` (:mod:`.hsm`)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KeyCreatedElsewhereError, NoKeyError
from .signing import FileKeyVault, FileSigner, Signer, SigningKeyVault

if TYPE_CHECKING:
    from services.common.config import CommonSettings


def _token(settings: CommonSettings):
    from .hsm import open_token

    return open_token(settings.keys.pkcs11)


def open_audit_signer(settings: CommonSettings, create: bool = True) -> Signer:
    """The key that signs the audit trail (created on first use when ``create``, unaudited: the
    key's creation is audited through services.common.crypto.provision; else NoKeyError)."""
    if settings.keys.backend == "pkcs11":
        from .hsm import audit_signer

        return audit_signer(_token(settings), create)
    path = settings.audit_signing_key_file
    if create:
        return FileSigner.load_or_create(path)
    try:
        return FileSigner.load(path)
    except FileNotFoundError:
        raise NoKeyError(f"{path}: no audit signing key (run `biogate migrate`)") from None


def create_audit_signer(settings: CommonSettings, next_key: bool = False) -> Signer:
    """Make the audit signing key (``next_key``: the next one, `biogate audit new-key`);
    KeyCreatedElsewhereError when it exists already."""
    if settings.keys.backend == "pkcs11":
        from .hsm import create_audit_signer as create_in_token

        return create_in_token(_token(settings), which="audit-next" if next_key else "audit")
    path = next_audit_key_file(settings) if next_key else settings.audit_signing_key_file
    try:
        return FileSigner.create(path)
    except FileExistsError:
        raise KeyCreatedElsewhereError(f"{path} exists") from None


def next_audit_key_file(settings: CommonSettings) -> Path:
    """Where `biogate audit new-key` keeps the next audit key (file backend), beside the key."""
    path = settings.audit_signing_key_file
    return path.with_name(f"{path.stem}.next{path.suffix}")


def open_next_audit_signer(settings: CommonSettings) -> Signer:
    """The next audit key `biogate audit new-key` made; NoKeyError when there is none."""
    if settings.keys.backend == "pkcs11":
        from .hsm import audit_signer

        return audit_signer(_token(settings), create=False, which="audit-next")
    path = next_audit_key_file(settings)
    try:
        return FileSigner.load(path)
    except FileNotFoundError:
        raise NoKeyError(f"{path}: no next audit signing key (run `biogate audit new-key`)") from None


def switch_audit_signer(settings: CommonSettings, to: str | None = None) -> None:
    """Make the next audit key the audit key of every process that opens it from now on; the old
    one is kept (file ``<name>.retired-<fingerprint>.pem``, token label ``...-audit-retired``):
    processes started before keep signing with it until they restart (then `biogate audit
    destroy-key` destroys it). ``to``: the next key's id, which finishes a switch interrupted in the
    token (:func:`audit_signers`); the file backend's switch, run again, finishes without it."""
    if settings.keys.backend == "pkcs11":
        from .hsm import switch_audit_signer as switch_in_token

        switch_in_token(_token(settings), to)
        return
    current, nxt = settings.audit_signing_key_file, next_audit_key_file(settings)
    if not nxt.exists():
        raise NoKeyError(f"{nxt}: no next audit signing key (run `biogate audit new-key`)")
    retired = retired_audit_key_file(settings, FileSigner.load(current).key_id)
    with contextlib.suppress(FileExistsError):  # a switch that stopped after this step, run again
        os.link(current, retired)
    os.replace(nxt, current)  # one step: a process starting meanwhile finds the old key or the new one
    _fsync_dir(current.parent)


def audit_signers(settings: CommonSettings) -> list[Signer]:
    """Every key that is the audit key now: one; two in the token after a switch interrupted between
    its writes (both trusted, a process starting takes either), which `biogate audit switch-key`
    finishes."""
    if settings.keys.backend == "pkcs11":
        from .hsm import audit_signers as in_token

        return list(in_token(_token(settings)))
    return [open_audit_signer(settings, create=False)]


AUDIT_KEY_DESTRUCTION = {"file": "file: overwritten and unlinked", "pkcs11": "pkcs11: private key object destroyed"}


def retired_audit_key_file(settings: CommonSettings, key_id: str) -> Path:
    """Where `biogate audit switch-key` keeps the audit key ``key_id`` it replaced (file backend)."""
    path = settings.audit_signing_key_file
    return path.with_name(f"{path.stem}.retired-{key_id.split(':')[-1]}{path.suffix}")


def has_retired_audit_key(settings: CommonSettings, key_id: str) -> bool:
    """Whether the private key of the retired audit key ``key_id`` is still here."""
    if settings.keys.backend == "pkcs11":
        from .hsm import has_retired_audit_key as in_token

        return in_token(_token(settings), key_id)
    path = retired_audit_key_file(settings, key_id)
    try:
        return FileSigner.load(path).key_id == key_id
    except (FileNotFoundError, ValueError):  # ValueError: overwritten by a destruction that could not unlink it
        return False


def destroy_retired_audit_key(settings: CommonSettings, key_id: str) -> None:
    """Destroy the private key of the retired audit key ``key_id`` (as :data:`AUDIT_KEY_DESTRUCTION`
    says); NoKeyError when it is not here."""
    if settings.keys.backend == "pkcs11":
        from .hsm import destroy_retired_audit_key as destroy_in_token

        destroy_in_token(_token(settings), key_id)
        return
    path = retired_audit_key_file(settings, key_id)
    if not has_retired_audit_key(settings, key_id):
        raise NoKeyError(f"{path}: no retired audit key {key_id}")
    # Overwritten before the unlink so that no other hard link to it keeps the key; best effort
    # still: a journaling or copy-on-write filesystem, or an SSD's wear levelling, may keep old blocks.
    fd = os.open(path, os.O_WRONLY)
    try:
        size, written = os.fstat(fd).st_size, 0
        while written < size:
            written += os.write(fd, secrets.token_bytes(size - written))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_token_vault(settings: CommonSettings, keys_file: Path) -> SigningKeyVault:
    """Where the MFA's decision-token signing keys live: the token, or ``keys_file`` (the file
    backend)."""
    if settings.keys.backend == "pkcs11":
        from .hsm import Pkcs11KeyVault

        return Pkcs11KeyVault(_token(settings))
    return FileKeyVault(keys_file)


def open_pkcs11_keyring(settings: CommonSettings, create: bool = True, first_key_id: str | None = None):
    from .hsm import Pkcs11Keyring

    return Pkcs11Keyring(_token(settings), settings.keys.cipher, create, first_key_id)
