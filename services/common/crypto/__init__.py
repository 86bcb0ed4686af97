"""Template protection: envelope encryption (AES-256-GCM or SM4-GCM) under a rotating keyring.

Typical use in a service::

    keyring = open_keyring(settings)
    crypto = EnvelopeCrypto(keyring)
    binding = TemplateBinding(tenant_id, subject_id, "face", model_id)
    envelope = crypto.encrypt_template(binding, template_bytes)
    storage.templates.put(TemplateRecord(..., envelope=envelope, key_id=envelope_key_id(envelope), ...))
    template_bytes = crypto.decrypt_template(binding, record.envelope)  # raises on any mismatch
"""

from .envelope import ContactBinding, EnvelopeCrypto, TemplateBinding, envelope_key_id, payload_digest
from .errors import (
    BindingMismatchError,
    KeyInUseError,
    KeyOperationInProgressError,
    KeyringError,
    TamperedEnvelopeError,
    TemplateDecryptionError,
    UnknownKeyError,
    WrongKeyError,
)
from .keyring import KeyInfo, Keyring, LocalKeyring, StaticKeyring, open_keyring

__all__ = [
    "BindingMismatchError",
    "ContactBinding",
    "EnvelopeCrypto",
    "KeyInUseError",
    "KeyInfo",
    "KeyOperationInProgressError",
    "Keyring",
    "KeyringError",
    "LocalKeyring",
    "StaticKeyring",
    "TamperedEnvelopeError",
    "TemplateBinding",
    "TemplateDecryptionError",
    "UnknownKeyError",
    "WrongKeyError",
    "envelope_key_id",
    "open_keyring",
    "payload_digest",
]
