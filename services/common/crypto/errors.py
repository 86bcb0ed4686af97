"""Errors of template and contact decryption, one class per cause so callers and operators can
tell a missing key from tampering or a template presented for the wrong subject."""

from __future__ import annotations


class TemplateDecryptionError(Exception):
    """An envelope could not be opened. Never caught and ignored: a failure is never a mismatch."""


class UnknownKeyError(TemplateDecryptionError):
    """The envelope names a key id the keyring does not hold (retired, or another keyring)."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"key id {key_id!r} is not in the keyring")
        self.key_id = key_id


class WrongKeyError(TemplateDecryptionError):
    """The keyring holds the key id, but its material is not the key that sealed the envelope."""


class TamperedEnvelopeError(TemplateDecryptionError):
    """The header or the ciphertext was altered, truncated or is not an envelope at all."""


class BindingMismatchError(TemplateDecryptionError):
    """The envelope is intact but bound to another tenant, subject, modality, model or channel:
    a template copied to another record."""

    def __init__(self, fields: list[str], purpose: str) -> None:
        self.fields = fields
        what = ", ".join(f"another {f}" for f in fields)
        super().__init__(f"this {purpose} envelope is bound to {what}")


class KeyringError(Exception):
    """The keyring itself is unusable: unreadable file, bad JSON, a management call it refuses."""


class NoKeyError(KeyringError):
    """A key the configuration names (the audit signing key, the keyring) does not exist yet."""


class NoKeyringError(NoKeyError):
    """The configured keyring (file or token keys) does not exist yet: `biogate keys init` makes it."""


class KeyCreatedElsewhereError(KeyringError):
    """Another process made the key this one set out to make; this one made none."""


class KeyInUseError(KeyringError):
    """A key cannot be retired while records are still sealed under it."""


class KeyOperationInProgressError(KeyringError):
    """Another rotation or retirement holds the database's key-operation lock; nothing was changed."""


class TokenUnavailableError(KeyringError):
    """The PKCS#11 token cannot be reached (the HSM restarting or failing over, the network to it
    down, its PIN changed): nothing was done; the same call later may succeed (gRPC UNAVAILABLE)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TokenKeyInvalidError(KeyringError):
    """The PKCS#11 token answers, but a key in it fails: its stored value is unreadable, or its type
    or attributes are not those of the key BioGate made (replaced, edited). Retrying never helps:
    the key must be restored from the HSM's backup (gRPC FAILED_PRECONDITION, KEY_STORE_KEY_INVALID)."""
