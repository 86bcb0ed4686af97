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
import random
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from services.common.crypto.signing import PublicKey, verify_signature

from .chain import checkpoint_message, format_ts, head_message
from .signing import key_map

if TYPE_CHECKING:
    from services.common.storage.interfaces import AuditCheckpoint, AuditRepository

_CHECKPOINT, _HEAD = "checkpoint-", "head-"
# Anchors the trail agrees with whose signatures one run checks, chosen at random: a forged one is
# found within a day of the CronJob's runs at a year of anchors, and at once by a full check.
SAMPLE = 1000


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
    ts: str = ""  # a checkpoint's time (format_ts), part of what the key signed; "" for a head

    def message(self, ts: str | None = None) -> bytes:
        """What the audit key signed (``ts``: a checkpoint's time when the anchor carries none)."""
        if self.kind == "head":
            return head_message(self.seq, self.hash)
        return checkpoint_message(self.seq, self.hash, datetime.fromisoformat(ts or self.ts))


def _name(kind: str, seq: int) -> str:
    return f"{_CHECKPOINT if kind == 'checkpoint' else _HEAD}{seq:012d}.json"


def _is_anchor_name(name: str) -> bool:
    return name.startswith((_CHECKPOINT, _HEAD)) and name.endswith(".json")


def _seq(name: str) -> int | None:
    """The seq an anchor's object name gives, or None."""
    digits = name.removesuffix(".json").rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else None


class _Reader:
    """Reads anchors back from the store and checks each against the audit public keys: an anchor
    vouches for its (seq, hash) only if the key signed exactly that, under that object's name.

    A checkpoint anchor written before anchors carried the checkpoint's time is checked with the
    time of the database's checkpoint at its seq (the signature covers seq, hash and time, so a
    wrong time only makes it fail); with that checkpoint gone it cannot be authenticated.

    Incremental: an anchor whose hash the trail holds at its seq (``trail_hash``) can neither show
    nor hide a rollback, whoever signed it, so its signature (~0.1 ms of CPU, nine tenths of the
    cost of reading a year of anchors back; bench/RESULTS.md) is checked only in a full check or
    when it falls in the random share ``sample`` of this run. Its name, form and key are always
    checked. An anchor the trail contradicts or lacks is always authenticated before it is
    reported as a rollback or taken as a checkpoint."""

    def __init__(self, store: WriteOnceStore, keys: dict[str, PublicKey],
                 repo: AuditRepository | None = None, sample: float = 1.0) -> None:
        self.store, self.keys, self._repo, self._sample = store, keys, repo, sample
        self._verified: dict[str, str] = {}

    def read(self, name: str, trail_hash: str | None = None) -> tuple[Anchor | None, str]:
        """(the anchor, "") when the audit key signed it or the trail holds its hash (``trail_hash``:
        the trail's hash at its seq) and it was not sampled; else (None, why not)."""
        item, why = self._parse(name)
        if item is None or (item.hash == trail_hash and self._sample < 1.0 and random.random() >= self._sample):
            return item, why
        if name not in self._verified:
            self._verified[name] = self._signature(item)
        why = self._verified[name]
        return (None, why) if why else (item, "")

    def _parse(self, name: str) -> tuple[Anchor | None, str]:
        """The anchor as its object reads, before its signature is checked, or (None, why not).
        Not kept: a run reads each object once (the head's seq twice), a store holds hundreds of
        thousands."""
        try:
            doc = json.loads(self.store.get(name))
            item = Anchor(str(doc["kind"]), int(doc["seq"]), str(doc["hash"]), str(doc["key_id"]),
                          str(doc["signature"]), str(doc.get("ts", "")))
            bytes.fromhex(item.signature)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"unreadable ({type(exc).__name__})"
        if item.kind not in ("checkpoint", "head") or _name(item.kind, item.seq) != name:
            return None, f"names a {item.kind} at seq {item.seq}, not what its object name says"
        if item.key_id not in self.keys:
            return None, (f"signed with unknown key {item.key_id!r} (an earlier audit key belongs in "
                          "audit.previous_public_keys)")
        if item.kind == "checkpoint" and not (item.ts or self._checkpoint_ts(item.seq)):
            return None, ("written without its checkpoint's time, and the database holds no checkpoint at "
                          f"seq {item.seq} to take it from: cannot be authenticated")
        return item, ""

    def _signature(self, item: Anchor) -> str:
        """"" when the key signed ``item``, else why not."""
        ts = item.ts or (self._checkpoint_ts(item.seq) if item.kind == "checkpoint" else None)
        try:
            ok = verify_signature(self.keys[item.key_id], bytes.fromhex(item.signature), item.message(ts))
        except ValueError:
            ok = False
        return "" if ok else "bad signature"

    def _checkpoint_ts(self, seq: int) -> str | None:
        """The time of the database's checkpoint at ``seq``: one row by the primary key, not them all."""
        cp = next(self._repo.iter_checkpoints(seq - 1, 1), None) if self._repo else None
        return format_ts(cp.ts) if cp is not None and cp.seq == seq else None


def _not_authentic(name: str, why: str) -> str:
    return f"{name}: {why}; not the audit key's anchor (forged or corrupted), not used as a checkpoint"


@dataclass
class AnchorReport:
    written: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _share(full: bool, sample: int | None, names: int) -> float:
    return 1.0 if full else min(1.0, (SAMPLE if sample is None else sample) / max(1, names))


def anchor(
    repo: AuditRepository, store: WriteOnceStore, public_key: PublicKey | Iterable[PublicKey], full: bool = False,
    sample: int | None = None,
) -> AnchorReport:
    """Copy the signed checkpoints not anchored yet, and the current signed head.

    An anchor is never taken back, so only what ``public_key`` verifies is copied; one already
    anchored at the same seq (either kind) whose hash the database now contradicts means the trail
    was rolled back and went on (the services append onto a genuinely signed older head): that is a
    problem, and the contradicting item is not anchored; an anchor in the store that the key did not
    sign is a problem of its own (the store's, not the trail's). The rest is copied. ``full``:
    check the signature of every anchor compared, also of those the database agrees with (otherwise
    about ``sample``, default :data:`SAMPLE`, of them at random).
    """
    keys = key_map(public_key)
    have = set(store.names())
    reader = _Reader(store, keys, repo, _share(full, sample, len(have)))
    report = AnchorReport()
    for item in _signed(repo):
        name = _name(item.kind, item.seq)
        contradicted = False
        for other in (n for n in (_name("checkpoint", item.seq), _name("head", item.seq)) if n in have):
            found, why = reader.read(other, trail_hash=item.hash)
            if found is None:
                problem = _not_authentic(other, why)
                if problem not in report.problems:
                    report.problems.append(problem)
            elif found.hash != item.hash:
                contradicted = True
                report.problems.append(
                    f"{other}: the database's {item.kind} at seq {item.seq} has another hash than the anchored "
                    "one: the trail was rolled back and written on (run `biogate audit verify --anchors`)"
                )
        if contradicted or name in have:
            continue
        key = keys.get(item.key_id)
        if key is None or not verify_signature(key, bytes.fromhex(item.signature), item.message()):
            why = "signed with an unknown key" if key is None else "bad signature"
            report.problems.append(f"{item.kind} at seq {item.seq}: {why}; not anchored")
            continue
        doc = dict(item.__dict__)
        if not item.ts:
            del doc["ts"]
        store.put(name, json.dumps(doc, sort_keys=True).encode())
        report.written.append(name)
    return report


def _signed(repo: AuditRepository) -> Iterator[Anchor]:
    """The trail's checkpoints, read a batch at a time (a multi-year trail holds hundreds of
    thousands), then its head."""
    for cp in repo.iter_checkpoints():
        yield Anchor("checkpoint", cp.seq, cp.hash, cp.key_id, bytes(cp.signature).hex(), format_ts(cp.ts))
    head = repo.head()
    if head is not None:
        yield Anchor("head", head.seq, head.hash, head.key_id, bytes(head.signature).hex())


@dataclass
class Anchored:
    """What the anchors vouch for: the (seq, hash) of each one the audit key signed, for
    ``verify(known_checkpoints=...)``, and a problem for each one it did not."""

    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def anchored(
    store: WriteOnceStore, public_key: PublicKey | Iterable[PublicKey], repo: AuditRepository | None = None,
    full: bool = False, sample: int | None = None,
) -> Anchored:
    """Every anchor in ``store``, each checked against the audit public key(s) (current and
    ``audit.previous_public_keys``); ``repo``: the trail, for the time of a checkpoint anchored
    without it, and to leave the signature of an anchor it agrees with to a random sample of about
    ``sample`` (default :data:`SAMPLE`; :class:`_Reader`); without it, or ``full``, every signature is
    checked."""
    names = [n for n in store.names() if _is_anchor_name(n)]
    reader = _Reader(store, key_map(public_key), repo, _share(full or repo is None, sample, len(names)))
    trail: dict[int, str] = {}
    if repo is not None and not full:
        # By the seq in each name, not read from the object first: one that names another is not authentic.
        trail = repo.hashes(seq for seq in map(_seq, names) if seq is not None)
    out = Anchored()
    for name in names:
        found, why = reader.read(name, trail.get(_seq(name) or 0))
        if found is None:
            out.problems.append(_not_authentic(name, why))
        else:
            out.checkpoints.append((found.seq, found.hash))
    return out


def unanchored(repo: AuditRepository, found: Anchored, max_age_s: float, now: datetime) -> AuditCheckpoint | None:
    """The newest checkpoint at least ``max_age_s`` old that no anchor in ``found`` reaches (none at
    its seq or beyond), or None. Anchors are written every few minutes: one missing that long means
    the store read is not the one `audit anchor` writes to, or that it stopped, and then a rollback
    or a truncation since the newest anchor goes unseen."""
    newest = max((seq for seq, _ in found.checkpoints), default=0)
    last = repo.checkpoint_before(now - timedelta(seconds=max_age_s))
    return last if last is not None and last.seq > newest else None
