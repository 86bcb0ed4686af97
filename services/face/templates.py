"""Face templates at rest: an L2-normalised float32 embedding, sealed in an envelope bound to
(tenant, subject, "face", model id), so that a template copied to another subject or model fails
to open instead of matching silently."""

from __future__ import annotations

import struct

import numpy as np

from services.common.crypto import EnvelopeCrypto, TemplateBinding, envelope_key_id
from services.common.storage import TemplateRecord

_MAGIC = b"BGF1"  # BioGate face template, format 1: magic, uint16 dim, dim x float32 LE
_HEADER = struct.Struct("<4sH")


def pack(embedding: np.ndarray) -> bytes:
    v = np.asarray(embedding, dtype="<f4").reshape(-1)
    return _HEADER.pack(_MAGIC, v.size) + v.tobytes()


def unpack(data: bytes) -> np.ndarray:
    magic, dim = _HEADER.unpack_from(data)
    if magic != _MAGIC or len(data) != _HEADER.size + 4 * dim:
        raise ValueError("not a face template of format 1")
    return np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32)


class TemplateVault:
    def __init__(self, crypto: EnvelopeCrypto) -> None:
        self.crypto = crypto

    def seal(self, tenant_id: str, subject_id: str, model_id: str, embedding: np.ndarray) -> tuple[bytes, str]:
        """(envelope, key id) of an embedding."""
        envelope = self.crypto.encrypt_template(TemplateBinding(tenant_id, subject_id, "face", model_id), pack(embedding))
        return envelope, envelope_key_id(envelope)

    def open(self, rec: TemplateRecord) -> np.ndarray:
        binding = TemplateBinding(rec.tenant_id, rec.subject_id, rec.modality, rec.model_id, rec.channel)
        return unpack(self.crypto.decrypt_template(binding, rec.envelope))
