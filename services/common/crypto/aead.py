"""The two authenticated ciphers BioGate seals data with: AES-256-GCM and SM4-GCM (GB/T 32907).

Both use a 96-bit random nonce and a 128-bit tag appended to the ciphertext.
"""

from __future__ import annotations

import os
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CipherName = Literal["AES-256-GCM", "SM4-GCM"]

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES: dict[str, int] = {"AES-256-GCM": 32, "SM4-GCM": 16}
# Stable one-byte ids written into envelopes; never renumber.
CIPHER_IDS: dict[str, int] = {"AES-256-GCM": 1, "SM4-GCM": 2}
CIPHER_BY_ID: dict[int, str] = {v: k for k, v in CIPHER_IDS.items()}


class AeadError(Exception):
    """Authentication failed: wrong key, altered data or altered associated data."""


def new_key(cipher: str) -> bytes:
    return os.urandom(KEY_BYTES[cipher])


class Aead:
    """One key of one cipher; reusable (a KEK is opened once per keyring load)."""

    __slots__ = ("cipher", "_key", "_aes")

    def __init__(self, cipher: str, key: bytes) -> None:
        _check_key(cipher, key)
        self.cipher = cipher
        self._key = key
        self._aes = AESGCM(key) if cipher == "AES-256-GCM" else None

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """nonce || ciphertext || tag."""
        nonce = os.urandom(NONCE_BYTES)
        if self._aes is not None:
            return nonce + self._aes.encrypt(nonce, plaintext, aad)
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        return nonce + enc.update(plaintext) + enc.finalize() + enc.tag

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < NONCE_BYTES + TAG_BYTES:
            raise AeadError("sealed data too short")
        nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        try:
            if self._aes is not None:
                return self._aes.decrypt(nonce, body, aad)
            ct, tag = body[:-TAG_BYTES], body[-TAG_BYTES:]
            dec = Cipher(algorithms.SM4(self._key), modes.GCM(nonce, tag)).decryptor()
            dec.authenticate_additional_data(aad)
            return dec.update(ct) + dec.finalize()
        except InvalidTag as exc:
            raise AeadError("authentication failed") from exc


def seal(cipher: str, key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return Aead(cipher, key).seal(plaintext, aad)


def open_(cipher: str, key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return Aead(cipher, key).open(sealed, aad)


def _check_key(cipher: str, key: bytes) -> None:
    if cipher not in KEY_BYTES:
        raise ValueError(f"unknown cipher {cipher!r}")
    if len(key) != KEY_BYTES[cipher]:
        raise ValueError(f"{cipher} needs a {KEY_BYTES[cipher] * 8}-bit key")
