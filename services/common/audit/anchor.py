"""Anchoring the audit trail outside the database: every signed checkpoint and the signed head,
copied to a write-once store that the database's administrator cannot rewrite.

The trail's hash chain and signatures detect any change made without the signing key, but not
someone who keeps an *older* signed head and truncates the trail back to it, nor someone who wipes
records, head and checkpoints together. Both are visible against anchors: a trail that ends before
the newest anchor, or does not hold the anchored hash at its seq, was cut
(``verify(known_checkpoints=anchored(store))``). :func:`anchor` copies only what the audit key
signed, and reports an anchored seq whose hash the database now contradicts: a rollback shows at
the next periodic anchoring, not only at the next audit.

The store is the shape of S3 Object Lock in compliance mode: ``put`` creates an object under a new
name and never overwrites one, objects are read back by name. :class:`DirectoryStore` is that shape
on a directory (another host's mount, a WORM volume): each object is created with ``O_EXCL`` and
left read-only (0444); a name that exists is :class:`FileExistsError`. An object-lock bucket is the
same three methods with a retention period set on each put.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from services.common.crypto.signing import PublicKey, verify_signature

from .chain import checkpoint_message, head_message
from .signing import key_map

if TYPE_CHECKING:
    from services.common.storage.interfaces import AuditRepository

_CHECKPOINT, _HEAD = "checkpoint-", "head-"


class WriteOnceStore(Protocol):
    def put(self, name: str, data: bytes) -> None:
        """Create object ``name``; FileExistsError if it exists (it is never replaced)."""

    def get(self, name: str) -> bytes: ...

    def names(self) -> list[str]: ...


class DirectoryStore:
    """Write-once objects as read-only files in one directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def put(self, name: str, data: bytes) -> None:
        if "/" in name or name.startswith("."):
            raise ValueError(f"not an object name: {name!r}")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []


@dataclass(frozen=True)
class Anchor:
    kind: str  # "checkpoint" or "head"
    seq: int
    hash: str
    key_id: str
    signature: str  # hex


def _name(kind: str, seq: int) -> str:
    return f"{_CHECKPOINT if kind == 'checkpoint' else _HEAD}{seq:012d}.json"


@dataclass
class AnchorReport:
    written: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def anchor(
    repo: AuditRepository, store: WriteOnceStore, public_key: PublicKey | Iterable[PublicKey]
) -> AnchorReport:
    """Copy the signed checkpoints not anchored yet, and the current signed head.

    An anchor is never taken back, so only what ``public_key`` verifies is copied; and one already
    anchored under the same seq with another hash means the trail was rolled back and went on (the
    services append onto a genuinely signed older head): both are problems, the rest is copied.
    """
    keys = key_map(public_key)
    have = set(store.names())
    items = [
        (Anchor("checkpoint", cp.seq, cp.hash, cp.key_id, bytes(cp.signature).hex()),
         checkpoint_message(cp.seq, cp.hash, cp.ts))
        for cp in repo.checkpoints()
    ]  # fmt: skip
    head = repo.head()
    if head is not None:
        items.append((Anchor("head", head.seq, head.hash, head.key_id, bytes(head.signature).hex()),
                      head_message(head.seq, head.hash)))
    report = AnchorReport()
    for item, message in items:
        name = _name(item.kind, item.seq)
        if name in have:
            if json.loads(store.get(name))["hash"] != item.hash:
                report.problems.append(
                    f"{name}: the database's {item.kind} at seq {item.seq} has another hash than the anchored "
                    "one: the trail was rolled back and written on (run `biogate audit verify --anchors`)"
                )
            continue
        key = keys.get(item.key_id)
        if key is None or not verify_signature(key, bytes.fromhex(item.signature), message):
            why = "signed with an unknown key" if key is None else "bad signature"
            report.problems.append(f"{item.kind} at seq {item.seq}: {why}; not anchored")
            continue
        store.put(name, json.dumps(item.__dict__, sort_keys=True).encode())
        report.written.append(name)
    return report


def anchored(store: WriteOnceStore) -> list[tuple[int, str]]:
    """(seq, hash) of every anchor, for ``verify(known_checkpoints=...)``."""
    out = []
    for name in store.names():
        if name.startswith((_CHECKPOINT, _HEAD)) and name.endswith(".json"):
            item = json.loads(store.get(name))
            out.append((int(item["seq"]), str(item["hash"])))
    return out
