"""Biometric templates at rest, one format and one sealing path for every modality.

Format (``BGT1``): magic, uint8 length of the modality, uint8 length of the model id, uint16
dimension, the modality and model id in UTF-8, then the L2-normalised embedding as float32
little-endian. The envelope is sealed by the envelope crypto bound to (tenant, subject, modality,
model, channel), so a template copied to another subject, model or channel fails to open instead
of matching silently; the header says the same in the clear text, and is checked on opening.
Templates written before this format (face ``BGF1``: magic, uint16 dim, floats; voice ``BGV1``:
magic, floats) still open: read old, write new.

:class:`Templates` is what a service does with them: the 1:1 lookup (not enrolled, a template of a
model the service no longer runs, consent), and the enrolment written together with its audit
record.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping

import numpy as np

from services.common.audit.templates import slot_details
from services.common.crypto import EnvelopeCrypto, TemplateBinding, envelope_key_id
from services.common.context import Principal
from services.common.runtime import Runtime
from services.common.storage import AlreadyExistsError, TemplateRecord
from services.common.storage.interfaces import Modality
from services.common.subjects import VERIFICATION

from .reasons import refusal

MAGIC = b"BGT1"
_HEAD = struct.Struct("<4sBBH")
_LEGACY_FACE = b"BGF1"  # magic, uint16 dim, dim x float32 LE
_LEGACY_VOICE = b"BGV1"  # magic, float32 LE values


class TemplateFormatError(ValueError):
    pass


def pack(modality: str, model_id: str, embedding: np.ndarray) -> bytes:
    v = np.asarray(embedding, dtype="<f4").reshape(-1)
    m, mid = modality.encode(), model_id.encode()
    if len(m) > 255 or len(mid) > 255 or v.size > 65535:
        raise TemplateFormatError("modality, model id or dimension too long for the template header")
    return _HEAD.pack(MAGIC, len(m), len(mid), v.size) + m + mid + v.tobytes()


def unpack(data: bytes, modality: str, model_id: str) -> np.ndarray:
    """The embedding of a template of ``modality`` and ``model_id`` (any format this module wrote)."""
    magic = data[:4]
    if magic == MAGIC and len(data) >= _HEAD.size:
        _, n_mod, n_model, dim = _HEAD.unpack_from(data)
        start = _HEAD.size + n_mod + n_model
        head_mod = data[_HEAD.size : _HEAD.size + n_mod].decode("utf-8", "replace")
        head_model = data[_HEAD.size + n_mod : start].decode("utf-8", "replace")
        if len(data) != start + 4 * dim:
            raise TemplateFormatError(f"template of {len(data)} bytes, its header says {start + 4 * dim}")
        if (head_mod, head_model) != (modality, model_id):
            raise TemplateFormatError(f"a {head_mod} template of {head_model}, expected {modality} of {model_id}")
        offset = start
    elif magic == _LEGACY_FACE and modality == "face" and len(data) >= 6:
        dim = struct.unpack_from("<H", data, 4)[0]
        if len(data) != 6 + 4 * dim:
            raise TemplateFormatError("not a face template of format BGF1")
        offset = 6
    elif magic == _LEGACY_VOICE and modality == "voice" and (len(data) - 4) % 4 == 0:
        offset = 4
    else:
        raise TemplateFormatError(f"not a {modality} template of a known format")
    return np.frombuffer(data, dtype="<f4", offset=offset).astype(np.float32)


class TemplateVault:
    """Seals and opens the templates of one modality."""

    def __init__(self, crypto: EnvelopeCrypto, modality: Modality) -> None:
        self.crypto, self.modality = crypto, modality

    def seal(self, tenant_id: str, subject_id: str, model_id: str, embedding: np.ndarray,
             channel: str = "") -> tuple[bytes, str]:
        """(envelope, key id) of an embedding."""
        binding = TemplateBinding(tenant_id, subject_id, self.modality, model_id, channel)
        envelope = self.crypto.encrypt_template(binding, pack(self.modality, model_id, embedding))
        return envelope, envelope_key_id(envelope)

    def open(self, rec: TemplateRecord) -> np.ndarray:
        if rec.modality != self.modality:
            raise TemplateFormatError(f"a {rec.modality} template record given to the {self.modality} vault")
        binding = TemplateBinding(rec.tenant_id, rec.subject_id, rec.modality, rec.model_id, rec.channel)
        return unpack(self.crypto.decrypt_template(binding, rec.envelope), rec.modality, rec.model_id)


class Templates:
    """The templates of one modality as the service uses them."""

    def __init__(self, rt: Runtime, modality: Modality) -> None:
        self.rt, self.modality = rt, modality
        self.vault = TemplateVault(rt.crypto, modality)

    def require_consent(self, tenant: str, subject: str) -> None:
        """Enrolment and every 1:1 use of a template need a recorded, unwithdrawn consent for biometric
        verification (PIPL art. 29, GDPR art. 9(2)(a)): a withdrawal stops verification at once."""
        if not self.rt.storage.subjects.has_active_consent(tenant, subject, VERIFICATION, self.modality):
            raise refusal("NO_CONSENT", f"no active consent for {self.modality} biometric verification of this "
                                        "subject (never recorded, or withdrawn); record it with MfaService.RecordConsent first")

    def _what(self, channel: str) -> str:
        return f"{channel} {self.modality}" if channel else self.modality

    def refuse_if_enrolled(self, tenant: str, subject: str, model_id: str, channel: str = "") -> None:
        if self.rt.storage.templates.get(tenant, subject, self.modality, model_id, channel):
            raise self._already_enrolled(channel)

    def _already_enrolled(self, channel: str):
        return refusal("ALREADY_ENROLLED", f"the subject already has a {self._what(channel)} template; "
                                           "set replace to re-enrol")

    def for_verification(self, tenant: str, subject: str, model_id: str, channel: str = "") -> np.ndarray:
        """The subject's template of ``model_id`` for a 1:1 comparison, after the consent check."""
        rec = self.rt.storage.templates.get(tenant, subject, self.modality, model_id, channel)
        if rec is None:
            others = [r for r in self.rt.storage.templates.list_for_subject(tenant, subject, self.modality)
                      if r.channel == channel]
            if others:
                raise refusal("TEMPLATE_MODEL_INACTIVE", (
                    f"the subject's {self._what(channel)} template was made with model {others[0].model_id}, which "
                    f"this service no longer uses (now {model_id}); re-enrol the subject with Enroll(replace=true)"))
            raise refusal("NOT_ENROLLED", f"the subject has no {self._what(channel)} template; enrol first")
        self.require_consent(tenant, subject)  # a withdrawal stops 1:1 use at once
        return self.vault.open(rec)

    def enrol(self, tenant: str, subject: str, model_id: str, embedding: np.ndarray, *, channel: str = "",
              samples: int, quality: Mapping[str, Any], replace: bool,
              details: Mapping[str, Any], caller: Principal) -> tuple[TemplateRecord, bool]:
        """Seal and store the template; it and its ``<modality>.enrolled`` audit record commit together.
        The record names the sealed payload's digest: which envelope is the slot's current one
        (``biogate audit templates`` finds an older one put back).
        -> (the stored record, whether it is a new row rather than a replacement)"""
        envelope, key_id = self.vault.seal(tenant, subject, model_id, embedding, channel)
        record = TemplateRecord(tenant, subject, self.modality, model_id, channel, envelope, key_id, samples,
                                dict(quality))
        try:
            with self.rt.storage.transaction():
                stored = self.rt.storage.templates.put(record, replace=replace)
                self.rt.audit.append(f"{self.modality}.enrolled", caller.name, tenant, subject,
                                     {**details, **slot_details(model_id, channel, envelope)})
        except AlreadyExistsError:
            raise self._already_enrolled(channel) from None
        return stored, stored.id == record.id
