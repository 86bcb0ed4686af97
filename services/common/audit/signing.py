"""The key that signs the audit trail's head and checkpoints: any
:class:`~services.common.crypto.signing.Signer` (an Ed25519 PEM file under data_dir by default,
or a key inside a PKCS#11 token); verification needs only public keys."""

from __future__ import annotations

from collections.abc import Iterable

from services.common.crypto.signing import FileSigner, PublicKey, Signer, key_id, load_public_key, public_key_pem

# The file implementation under its historical name.
AuditSigner = FileSigner


def key_map(keys: PublicKey | Iterable[PublicKey]) -> dict[str, PublicKey]:
    """Public keys by key id; verification accepts several (e.g. after a signing-key change)."""
    if not isinstance(keys, Iterable):
        keys = [keys]
    return {key_id(k): k for k in keys}


__all__ = ["AuditSigner", "Signer", "key_id", "key_map", "load_public_key", "public_key_pem"]
