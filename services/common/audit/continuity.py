"""Audit key continuity: each audit signing key after the first is introduced in the trail itself,
vouched for by the key before it.

``biogate audit new-key`` makes the next key and appends one ``audit.key_introduced`` record,
signed as every record is by the current key, with a checkpoint at its seq whatever
``audit.checkpoint_every`` says. Its details carry both public keys (DER, hex) and their ids, and
``proof``: the new key's signature over both public keys. The introduction is valid when

* the checkpoint at its seq names the record's hash, the record's hash is its content's, and the
  introducer's (``by``) signature over the checkpoint verifies: the old key vouches for the
  new one;
* ``proof`` verifies under the new key: the new key accepts the old one as its predecessor. Without
  it anyone who can write the database and holds some key of their own could "introduce" the real
  current key as their key's successor, and so be trusted by whoever trusts the current key.

Each valid introduction links two keys both ways. The keys a trail trusts are those linked, through
any number of introductions, to a key the deployment configures (its own key, and
``audit.previous_public_keys`` for trails older than the introductions): a service chains onto a
head signed by any of them, ``biogate audit verify`` accepts their signatures. A record that
claims to introduce a key but is not valid trusts nothing and is reported.

Introductions are found without walking the trail: they are the records of their event type that
have a checkpoint (``AuditRepository.checkpointed``: a partial index of them, one seek each).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from services.common.crypto.signing import PublicKey, algorithm_of, key_id, verify_signature

from .chain import checkpoint_message, row_hash
from .signing import key_map

if TYPE_CHECKING:
    from services.common.crypto.signing import Signer
    from services.common.storage.interfaces import AuditCheckpoint, AuditRepository, AuditRow

INTRODUCED = "audit.key_introduced"
DESTROYED = "audit.key_destroyed"  # `biogate audit destroy-key`: a retired key's private half destroyed


def _der(public_key: PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).hex()


def _proof_message(new_der: str, by_der: str) -> bytes:
    return f"biogate-audit-key-introduction-v1\x00{new_der}\x00{by_der}".encode("ascii")


def introduction_details(new: Signer, by: Signer) -> dict[str, Any]:
    """The details of the record in which ``by`` (the current key) introduces ``new``."""
    new_der, by_der = _der(new.public_key), _der(by.public_key)
    # The introducer under "by" as "key_id": the audit guard lets a key id pass under that name only.
    return {"key": "audit-signing", "key_id": new.key_id, "algorithm": new.algorithm, "public_key": new_der,
            "by": {"key_id": by.key_id, "public_key": by_der},
            "proof": new.sign(_proof_message(new_der, by_der)).hex()}


@dataclass(frozen=True)
class Introduction:
    seq: int
    key_id: str
    public_key: PublicKey
    by_key_id: str
    by_public_key: PublicKey


@dataclass
class TrailKeys:
    """The keys a trail trusts, and what it says of them."""

    keys: dict[str, PublicKey]
    introduced_at: dict[str, int] = field(default_factory=dict)  # key id -> seq of its first valid introduction
    first_introduction: int | None = None
    links: list[Introduction] = field(default_factory=list)  # the valid introductions, in seq order
    problems: list[str] = field(default_factory=list)  # records that claim an introduction but are not valid


def _load(der_hex: str) -> PublicKey:
    key = serialization.load_der_public_key(bytes.fromhex(der_hex))
    algorithm_of(key)  # type: ignore[arg-type]  # raises for other key types
    return key  # type: ignore[return-value]


def check_introduction(row: AuditRow, cp: AuditCheckpoint | None) -> Introduction | str:
    """The introduction ``row`` makes, or why it makes none (``cp``: the checkpoint at its seq)."""
    try:
        d = json.loads(row.details)
        new_der, by_der = str(d["public_key"]), str(d["by"]["public_key"])
        new, by = _load(new_der), _load(by_der)
        proof = bytes.fromhex(str(d["proof"]))
        new_id, by_id = str(d["key_id"]), str(d["by"]["key_id"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"cannot be read ({type(exc).__name__})"
    if key_id(new) != new_id or key_id(by) != by_id:
        return "names key ids that are not its public keys'"
    if cp is None:
        return "has no checkpoint: the key before it never vouched for it"
    if row_hash(row) != row.hash or cp.hash != row.hash:
        return "is not the record its checkpoint signs"
    if cp.key_id != by_id or not verify_signature(by, bytes(cp.signature), checkpoint_message(cp.seq, cp.hash, cp.ts)):
        return f"is not vouched for by {by_id!r} (its checkpoint is not that key's signature)"
    if not verify_signature(new, proof, _proof_message(new_der, by_der)):
        return f"carries no valid proof from {new_id!r} itself"
    return Introduction(row.seq, new_id, new, by_id, by)


def trail_keys(repo: AuditRepository, configured: PublicKey | Iterable[PublicKey]) -> TrailKeys:
    """``configured`` and every key linked to one of them by valid introductions in the trail."""
    out = TrailKeys(keys=key_map(configured))
    links = out.links
    for row, cp in repo.checkpointed(INTRODUCED):
        found = check_introduction(row, cp)
        if isinstance(found, str):
            out.problems.append(f"seq {row.seq}: {INTRODUCED} {found}; it introduces no key")
            continue
        links.append(found)
        out.introduced_at.setdefault(found.key_id, found.seq)
        out.first_introduction = out.first_introduction or found.seq
    grown = True
    while grown:
        grown = False
        for link in links:
            for known, other in ((link.by_key_id, link.key_id), (link.key_id, link.by_key_id)):
                if known in out.keys and other not in out.keys:
                    out.keys[other] = link.public_key if other == link.key_id else link.by_public_key
                    grown = True
    return out


def destroyed_at(repo: AuditRepository, trail: TrailKeys) -> dict[str, int]:
    """Key id -> seq of the first ``audit.key_destroyed`` record naming it whose checkpoint a key of
    ``trail`` signed (the record ``biogate audit destroy-key`` writes with one)."""
    out: dict[str, int] = {}
    for row, cp in repo.checkpointed(DESTROYED):
        key = trail.keys.get(cp.key_id)
        if key is None or row_hash(row) != row.hash or cp.hash != row.hash or not verify_signature(
                key, bytes(cp.signature), checkpoint_message(cp.seq, cp.hash, cp.ts)):
            continue  # the walk reports a record or checkpoint that is not what was signed
        named = destroyed_key(row)
        if named is not None:
            out.setdefault(named, row.seq)
    return out


def destroyed_key(row: AuditRow) -> str | None:
    """The key id an ``audit.key_destroyed`` record names, or None where it names none."""
    try:
        return str(json.loads(row.details)["key_id"])
    except (ValueError, KeyError, TypeError):
        return None


__all__ = ["DESTROYED", "INTRODUCED", "Introduction", "TrailKeys", "check_introduction", "destroyed_at", "destroyed_key",
           "introduction_details", "trail_keys"]
