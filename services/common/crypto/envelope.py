"""Envelope encryption of biometric templates and contact data.

Each record is sealed with a fresh data key (AES-256-GCM or SM4-GCM); the data key is wrapped
by a key-encryption key (KEK) from the :mod:`keyring <services.common.crypto.keyring>`. The
payload's associated data is a digest of the record's *binding* (tenant, subject, modality,
model, channel — or tenant, subject for a contact), so an envelope copied to another record
does not open. The binding digest and short per-field tags sit in the header, which lets
:meth:`EnvelopeCrypto.decrypt_template` say *which* binding field differs instead of failing
generically.

Envelope format, version 1 (all integers big-endian)::

    magic "BGE" | version u8 = 1 | cipher id u8 | binding digest (32) |
    field count u8 | field tags (4 each) |                            <- payload AAD ends here
    key id length u8 | key id (ASCII) | KEK fingerprint (8) |
    wrapped key length u16 | wrapped data key |                       <- changed by re-wrap
    nonce (12) | ciphertext | tag (16)

Re-wrapping under a new KEK (rotation) replaces only the key part, so it needs neither the
binding nor a re-encryption of the payload. The payload cipher stays what it was sealed with;
the wrap uses the new KEK's cipher.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import aead
from .errors import BindingMismatchError, TamperedEnvelopeError, WrongKeyError
from .keyring import Keyring

if TYPE_CHECKING:
    from services.common.storage.interfaces import Modality

MAGIC = b"BGE"
VERSION = 1
_DIGEST_BYTES = 32
_TAG_BYTES = 4
_FP_BYTES = 8


@dataclass(frozen=True)
class TemplateBinding:
    """What a template belongs to. Part of the associated data: change any field and the
    envelope no longer opens."""

    tenant_id: str
    subject_id: str
    modality: Modality
    model_id: str
    channel: str = ""  # voice: "wideband" | "telephone"; face: ""

    def fields(self) -> dict[str, str]:
        return {
            "purpose": "template",
            "tenant": self.tenant_id,
            "subject": self.subject_id,
            "modality": self.modality,
            "model": self.model_id,
            "channel": self.channel,
        }


@dataclass(frozen=True)
class ContactBinding:
    tenant_id: str
    subject_id: str

    def fields(self) -> dict[str, str]:
        return {"purpose": "contact", "tenant": self.tenant_id, "subject": self.subject_id}


class Binding(Protocol):
    """What sealed data belongs to (TemplateBinding, ContactBinding, a service's own): every field
    is associated data."""

    def fields(self) -> dict[str, str]: ...


def _encode(name: str, value: str) -> bytes:
    raw = value.encode("utf-8")
    return name.encode("ascii") + b"=" + len(raw).to_bytes(4, "big") + raw  # length-prefixed


def _digest(fields: dict[str, str]) -> bytes:
    h = hashlib.sha256(b"biogate-binding-v1\x00")
    for name, value in fields.items():
        h.update(_encode(name, value))
    return h.digest()


def _field_tags(fields: dict[str, str]) -> list[bytes]:
    return [
        hashlib.sha256(b"biogate-field-v1\x00" + _encode(name, value)).digest()[:_TAG_BYTES]
        for name, value in fields.items()
    ]


@dataclass(frozen=True)
class _Parsed:
    cipher: str
    aad: bytes  # magic .. field tags: the payload's associated data
    digest: bytes
    tags: list[bytes]
    key_id: str
    fingerprint: bytes
    wrapped: bytes
    payload: bytes  # nonce || ciphertext || tag


@dataclass(frozen=True)
class _Header:
    cipher: str
    aad_end: int
    digest: bytes
    tags: list[bytes]
    key_id: str
    fingerprint: bytes
    wrapped_len: int
    end: int  # where the wrapped key starts


# Where the field count is, the bytes after the key id that the header holds, and the longest
# header (every u8 count at its most): a store can slice a record's header without parsing it.
FIELD_COUNT_AT = 5 + _DIGEST_BYTES
KEY_ID_TAIL = _FP_BYTES + 2
TAG_BYTES = _TAG_BYTES
HEADER_MAX = FIELD_COUNT_AT + 1 + 255 * _TAG_BYTES + 1 + 255 + KEY_ID_TAIL


def _header(data: bytes) -> _Header:
    """The header at the start of ``data`` (the envelope, or at least its first bytes up to the
    wrapped key)."""
    try:
        if data[:3] != MAGIC:
            raise TamperedEnvelopeError("not a BioGate envelope (bad magic)")
        version, cipher_id = data[3], data[4]
        if version != VERSION:
            raise TamperedEnvelopeError(f"unsupported envelope version {version}")
        cipher = aead.CIPHER_BY_ID.get(cipher_id)
        if cipher is None:
            raise TamperedEnvelopeError(f"unknown cipher id {cipher_id}")
        pos = 5
        digest = data[pos : pos + _DIGEST_BYTES]
        pos += _DIGEST_BYTES
        n = data[pos]
        pos += 1
        tags = [bytes(data[pos + i * _TAG_BYTES : pos + (i + 1) * _TAG_BYTES]) for i in range(n)]
        pos += n * _TAG_BYTES
        aad_end = pos
        klen = data[pos]
        key_id = data[pos + 1 : pos + 1 + klen].decode("ascii")
        pos += 1 + klen
        fp = data[pos : pos + _FP_BYTES]
        pos += _FP_BYTES
        (wlen,) = struct.unpack_from(">H", data, pos)
        pos += 2
    except (IndexError, struct.error, UnicodeDecodeError):
        raise TamperedEnvelopeError("truncated or malformed envelope header") from None
    if len(key_id) != klen:
        raise TamperedEnvelopeError("truncated envelope")
    return _Header(cipher, aad_end, bytes(digest), tags, key_id, bytes(fp), wlen, pos)


def _check_size(header: _Header, size: int) -> None:
    if size < header.end + header.wrapped_len + aead.NONCE_BYTES + aead.TAG_BYTES:
        raise TamperedEnvelopeError("truncated envelope")


def _parse(envelope: bytes) -> _Parsed:
    h = _header(envelope)
    _check_size(h, len(envelope))
    wrapped_end = h.end + h.wrapped_len
    return _Parsed(h.cipher, bytes(envelope[: h.aad_end]), h.digest, h.tags, h.key_id, h.fingerprint,
                   bytes(envelope[h.end : wrapped_end]), bytes(envelope[wrapped_end:]))


def _key_part(key_id: str, fp: bytes, wrapped: bytes) -> bytes:
    kid = key_id.encode("ascii")
    if len(kid) > 255 or len(wrapped) > 0xFFFF:
        raise ValueError("key id or wrapped key too long for the envelope format")
    return bytes([len(kid)]) + kid + fp.ljust(_FP_BYTES, b"\0")[:_FP_BYTES] + struct.pack(">H", len(wrapped)) + wrapped


def _wrap_aad(aad: bytes, key_id: str) -> bytes:
    return b"biogate-dek-v1\x00" + key_id.encode("ascii") + b"\x00" + aad


class EnvelopeCrypto:
    """Seals and opens templates and contact data with a :class:`Keyring`. Thread-safe."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    # -- generic ------------------------------------------------------------------------------

    def seal(self, binding: Binding, plaintext: bytes) -> bytes:
        info = self.keyring.key_info(self.keyring.primary_key_id())
        fields = binding.fields()
        tags = _field_tags(fields)
        aad = (
            MAGIC
            + bytes([VERSION, aead.CIPHER_IDS[info.cipher]])
            + _digest(fields)
            + bytes([len(tags)])
            + b"".join(tags)
        )
        data_key = aead.new_key(info.cipher)
        wrapped = self.keyring.wrap(info.key_id, data_key, _wrap_aad(aad, info.key_id))
        payload = aead.seal(info.cipher, data_key, plaintext, aad)
        return aad + _key_part(info.key_id, info.fingerprint, wrapped) + payload

    def open(self, binding: Binding, envelope: bytes) -> bytes:
        p = _parse(envelope)
        data_key = self._unwrap(p)
        try:
            plaintext = aead.open_(p.cipher, data_key, p.payload, p.aad)
        except aead.AeadError:
            raise TamperedEnvelopeError("the ciphertext or its header was altered") from None
        fields = binding.fields()
        # The header is authentic now; a digest that differs means a genuine other binding.
        if not hmac.compare_digest(p.digest, _digest(fields)):
            raise BindingMismatchError(_differing(fields, p.tags), fields["purpose"])
        return plaintext

    def rewrap(self, envelope: bytes, key_id: str | None = None) -> bytes:
        """The same envelope with its data key wrapped under ``key_id`` (default: the primary).

        Checks the payload's integrity on the way, so rotation reports a damaged record rather
        than carrying it forward.
        """
        p = _parse(envelope)
        data_key = self._unwrap(p)
        try:
            aead.open_(p.cipher, data_key, p.payload, p.aad)
        except aead.AeadError:
            raise TamperedEnvelopeError("the ciphertext or its header was altered") from None
        target = self.keyring.key_info(key_id or self.keyring.primary_key_id())
        wrapped = self.keyring.wrap(target.key_id, data_key, _wrap_aad(p.aad, target.key_id))
        return p.aad + _key_part(target.key_id, target.fingerprint, wrapped) + p.payload

    def _unwrap(self, p: _Parsed) -> bytes:
        info = self.keyring.key_info(p.key_id)  # UnknownKeyError
        same_material = bool(info.fingerprint) and hmac.compare_digest(info.fingerprint, p.fingerprint)
        try:
            data_key = self.keyring.unwrap(p.key_id, p.wrapped, _wrap_aad(p.aad, p.key_id))
        except WrongKeyError:
            if same_material:
                # The keyring's key is the one that sealed this: the header must have changed.
                raise TamperedEnvelopeError("the envelope header or wrapped data key was altered") from None
            sealer = self._key_with_fingerprint(p.fingerprint)
            if sealer is not None:
                raise TamperedEnvelopeError(
                    f"the envelope's key id was altered: it names {p.key_id!r}, its fingerprint is that of "
                    f"{sealer!r}"
                ) from None
            raise WrongKeyError(
                f"the keyring's key {p.key_id!r} is not the key this envelope was sealed with "
                "(different key material under the same id)"
            ) from None
        if info.fingerprint and not same_material:
            raise TamperedEnvelopeError("the envelope's key fingerprint was altered")
        return data_key

    def _key_with_fingerprint(self, fp: bytes) -> str | None:
        """The id of the keyring's key whose check value ``fp`` is (failures only: it lists the keys)."""
        if not fp.strip(b"\0"):
            return None  # written by a keyring that knows no check values
        return next((k.key_id for k in self.keyring.keys() if k.fingerprint and hmac.compare_digest(k.fingerprint, fp)),
                    None)

    # -- templates ----------------------------------------------------------------------------

    def encrypt_template(self, binding: TemplateBinding, template: bytes) -> bytes:
        return self.seal(binding, template)

    def decrypt_template(self, binding: TemplateBinding, envelope: bytes) -> bytes:
        return self.open(binding, envelope)

    # -- contact data (phone numbers) ---------------------------------------------------------

    def encrypt_contact(self, tenant_id: str, subject_id: str, phone_e164: str) -> bytes:
        return self.seal(ContactBinding(tenant_id, subject_id), phone_e164.encode("utf-8"))

    def decrypt_contact(self, tenant_id: str, subject_id: str, envelope: bytes) -> str:
        return self.open(ContactBinding(tenant_id, subject_id), envelope).decode("utf-8")


def envelope_key_id(envelope: bytes) -> str:
    """The id of the KEK an envelope's data key is wrapped under (no key needed)."""
    return header_key_id(envelope, len(envelope))


def header_key_id(head: bytes, size: int) -> str:
    """The key id of an envelope of ``size`` bytes from its first bytes: at least its header up to
    the wrapped key (:data:`HEADER_MAX` bytes always are). TamperedEnvelopeError exactly where
    parsing the whole envelope raises."""
    h = _header(head)
    _check_size(h, size)
    return h.key_id


def payload_digest(envelope: bytes) -> str:
    """Which sealed template an envelope holds: SHA-256 of its payload (nonce, ciphertext, tag), the
    part a re-wrap keeps, so the digest survives key rotation. The payload is ciphertext under a
    fresh data key and random nonce, so the digest says nothing of the template; the tag
    authenticates the header, so no other envelope with this payload opens. No key needed."""
    return hashlib.sha256(b"biogate-sealed-payload-v1\x00" + _parse(envelope).payload).hexdigest()


def _differing(expected: dict[str, str], tags: list[bytes]) -> list[str]:
    if len(tags) != len(expected):
        return ["purpose"]
    diff = [name for name, want, got in zip(expected, _field_tags(expected), tags, strict=True) if want != got]
    return diff or ["binding"]  # all 4-byte tags collide: still a mismatch, just unnamed


__all__ = [
    "EnvelopeCrypto",
    "TemplateBinding",
    "ContactBinding",
    "envelope_key_id",
    "header_key_id",
    "payload_digest",
]
