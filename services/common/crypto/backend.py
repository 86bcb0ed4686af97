"""The key backend the configuration selects (``keys.backend``): which keyring, audit signer and
MFA token-key vault a process uses. ``file`` keeps them under ``data_dir`` (the embedded
default); ``pkcs11`` keeps them in the token of ``keys.pkcs11`` (:mod:`.hsm`)."""

from __future__ import annotations

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


def create_audit_signer(settings: CommonSettings) -> Signer:
    """Make the audit signing key; KeyCreatedElsewhereError when it exists already."""
    if settings.keys.backend == "pkcs11":
        from .hsm import create_audit_signer as create_in_token

        return create_in_token(_token(settings))
    try:
        return FileSigner.create(settings.audit_signing_key_file)
    except FileExistsError:
        raise KeyCreatedElsewhereError(f"{settings.audit_signing_key_file} exists") from None


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
