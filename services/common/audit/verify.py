"""Checking the audit trail end to end with the signing public key.

What is detected: a record changed in any column (its hash no longer matches), a record
deleted, inserted or moved (the next record's ``prev_hash`` no longer links), the first records
dropped (the chain does not start at seq 1 from the genesis hash), the last records dropped or
appended without the key (the signed head no longer names the last record), and any head or
checkpoint whose signature does not verify or that disagrees with the record it names.

The services may keep appending while it runs: the head is read before the records it names, and a
record past it makes verify read the head (and checkpoints) again, so only records that no signed
head covers are reported, never ones committed during the walk.

An empty trail is a failure while the database holds rows that are only ever written with an
audit record (``data_rows``: templates, consents, phone numbers): wiping the records, the head and
the checkpoints together leaves nothing to check a chain against, but not an empty trail.

Residual risk: someone with write access to the database who kept an *older* signed head can
truncate the trail back to that head and put the old head back; the result verifies. The
signing key does not help, because the old head was genuinely signed. Mitigation: anchor every
checkpoint and the head outside the database, in storage its administrator cannot rewrite
(services/common/audit/anchor.py: write-once objects, `biogate audit anchor`), and compare: a
trail that ends before the newest anchor was truncated. ``verify(..., known_checkpoints=...)``
takes those.

Keys: a signature counts when its key is configured (``public_key``) or linked to a configured key
by introductions in the trail (continuity.py); a key that signs before its introduction, without
one once the trail introduces its keys, or after the trail recorded its destruction, is reported.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import takewhile
from typing import TYPE_CHECKING

from services.common.crypto.signing import PublicKey, verify_signature

from .chain import checkpoint_message, head_message, row_hash
from .continuity import INTRODUCED, TrailKeys, destroyed_at, trail_keys

if TYPE_CHECKING:
    from services.common.storage.interfaces import AuditCheckpoint, AuditHead, AuditRepository, AuditRow

MAX_PROBLEMS = 1000  # beyond this the report only counts


@dataclass
class VerifyReport:
    records_checked: int = 0
    checkpoints_checked: int = 0
    head_seq: int | None = None
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more_problems += 1

    def render(self) -> str:
        lines = [
            f"audit trail: {'OK' if self.ok else 'FAILED'}; {self.records_checked} records, "
            f"{self.checkpoints_checked} checkpoints, head at seq {self.head_seq}"
        ]
        lines += [f"  {p}" for p in self.problems]
        if self.more_problems:
            lines.append(f"  ... and {self.more_problems} more problems")
        return "\n".join(lines)


def _signature_ok(trail: TrailKeys, destroyed: Mapping[str, int], key_id: str, seq: int, signature: bytes,
                  message: bytes) -> str | None:
    key = trail.keys.get(key_id)
    if key is None:
        return f"signed with unknown key {key_id!r} (neither a configured audit key nor one the trail introduces)"
    if not verify_signature(key, bytes(signature), message):
        return "bad signature"
    since = trail.introduced_at.get(key_id)
    if since is not None and seq <= since:
        return f"signed with key {key_id!r} before the trail introduced it (seq {since})"
    gone = destroyed.get(key_id)
    if gone is not None and seq > gone:
        return (f"signed with key {key_id!r} after the trail recorded its destruction (seq {gone}): a copy of its "
                "private key survives (a process not restarted onto its successor, a backup, a leak)")
    return None


def _never_introduced(report: VerifyReport, trail: TrailKeys, first_signed: Mapping[str, int]) -> None:
    """A key that signs only after the trail began introducing its keys, without an introduction of
    its own, was changed by hand: nothing in the trail ties it to the key before it."""
    if trail.first_introduction is None:
        return  # a trail from before introductions: its keys are the configured ones
    for kid, seq in sorted(first_signed.items(), key=lambda item: item[1]):
        if kid not in trail.introduced_at and seq > trail.first_introduction:
            report.add(f"seq {seq}: signed with key {kid!r}, which the trail never introduced (the trail introduces "
                       f"its keys since seq {trail.first_introduction}; this key is trusted only because it is "
                       "configured, not vouched for by the key before it)")


class _Checkpoints:
    """The checkpoints in seq order, read a batch at a time as the walk reaches their records (a
    multi-year trail has millions: never all in memory). Those read ahead of the walk wait here."""

    def __init__(self, repo: AuditRepository, batch: int) -> None:
        self._repo, self._batch = repo, batch
        self._rows: Iterator[AuditCheckpoint] = repo.iter_checkpoints(0, batch)
        self._ahead: deque[AuditCheckpoint] = deque()
        self.newest_seq = 0  # the highest seq read

    def _read(self) -> bool:
        cp = next(self._rows, None)
        if cp is None:
            return False
        self._ahead.append(cp)
        self.newest_seq = cp.seq
        return True

    def at(self, seq: int) -> AuditCheckpoint | None:
        """The checkpoint at ``seq``, if any; those before it are passed (the walk asks in seq order)."""
        while self._ahead or self._read():
            if self._ahead[0].seq > seq:
                return None
            cp = self._ahead.popleft()
            if cp.seq == seq:
                return cp
        return None

    def newest(self) -> int:
        """The highest seq of a checkpoint, reading to the end."""
        while self._read():
            pass
        return self.newest_seq

    def reread(self) -> None:
        """Also see the checkpoints committed since the end was read (a newer head was read)."""
        self._rows = self._repo.iter_checkpoints(self.newest_seq, self._batch)


def verify(
    storage_audit: AuditRepository,
    public_key: PublicKey | Iterable[PublicKey],
    known_checkpoints: Iterable[tuple[int, str]] = (),
    checkpoint_every: int | None = None,
    batch: int = 1000,
    data_rows: Mapping[str, int] | None = None,
    on_record: Callable[[AuditRow], None] | None = None,
) -> VerifyReport:
    """Walk the whole trail.

    ``known_checkpoints``: (seq, hash) pairs kept outside the database, authenticated by the caller
    (:func:`.anchor.anchored` checks each anchor's signature). ``checkpoint_every``:
    also require a checkpoint at every multiple of it (only if it never changed). ``data_rows``:
    counts of audited rows the database holds (``Storage.audited_rows``); any with an empty trail
    is a failure. ``on_record``: called with each record walked, in order (one pass serves a
    caller's own reading of the trail too).
    """
    report = VerifyReport()
    external: dict[int, set[str]] = {}  # every hash kept for a seq: two that differ cannot both match
    for seq, hash_ in known_checkpoints:
        external.setdefault(seq, set()).add(hash_)
    # The head first, then the checkpoints: every record and checkpoint up to the head committed
    # before it, so the walk below sees them all; records the services append meanwhile are past it.
    head = storage_audit.head()
    checkpoints = _Checkpoints(storage_audit, batch)
    expected_seq, prev, last = 1, None, None  # the first record's prev_hash is NULL
    uncovered = False  # a record past the head read after it: appended without the key; stop re-reading

    while True:
        walked = False
        rows = storage_audit.iter_records(from_seq=expected_seq, batch=batch)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except (ValueError, TypeError, OverflowError) as exc:  # a column the database should never hold
                report.head_seq = head.seq if head else None
                report.add(f"the record after seq {expected_seq - 1} cannot be read ({type(exc).__name__}: {exc}): "
                           "it was changed outside BioGate; the records after it were not checked")
                return report
            walked = True
            if not uncovered and row.seq > (head.seq if head else 0):
                newer = storage_audit.head()  # appended while this walk ran, or forged
                if newer is not None and newer.seq >= row.seq:
                    head = newer
                    checkpoints.reread()
                else:
                    uncovered = True
            _check_record(report, row, expected_seq, prev, last, checkpoints.at(row.seq), external, checkpoint_every)
            if on_record is not None:
                on_record(row)
            expected_seq, prev, last = row.seq + 1, row.hash, row
        # A head or checkpoint read during the walk's last batch names records committed after that
        # batch was read: they are there now, unless the trail was cut.
        wanted = max(head.seq if head else 0, checkpoints.newest())
        if not walked or (last is not None and last.seq >= wanted):
            break

    # Read after the walk: every key whose head or checkpoint was read is introduced by now.
    trail = trail_keys(storage_audit, public_key)
    for problem in trail.problems:
        report.add(problem)
    destroyed = destroyed_at(storage_audit, trail)
    first_signed: dict[str, int] = {}
    # Read again, a batch at a time: the keys to check them with are known only after the walk. Up to
    # the newest the walk read: those committed since belong to records it did not walk.
    for cp in takewhile(lambda c: c.seq <= checkpoints.newest_seq, storage_audit.iter_checkpoints(0, batch)):
        seq = cp.seq
        report.checkpoints_checked += 1
        bad = _signature_ok(trail, destroyed, cp.key_id, seq, cp.signature, checkpoint_message(cp.seq, cp.hash, cp.ts))
        if bad:
            report.add(f"checkpoint seq {seq}: {bad}")
        else:
            first_signed.setdefault(cp.key_id, seq)
        if last is None or seq > last.seq:
            report.add(f"checkpoint seq {seq}: the record it signs is missing (trail truncated)")
    newest_external = max(external, default=0)
    if newest_external > (last.seq if last else 0):
        report.add(f"seq {newest_external}: an externally kept checkpoint is beyond the end of the trail (truncated)")

    held = {what: n for what, n in (data_rows or {}).items() if n}
    if last is None and held:
        report.add("the trail is empty while the database holds " + ", ".join(f"{n} {what}" for what, n in held.items())
                   + ": every one was written with an audit record, so the trail was wiped")

    report.head_seq = head.seq if head else None
    if head is not None:
        bad = _signature_ok(trail, destroyed, head.key_id, head.seq, head.signature,
                            head_message(head.seq, head.hash))
        if bad:
            report.add(f"head seq {head.seq}: {bad}")
        else:
            first_signed.setdefault(head.key_id, head.seq)
    _never_introduced(report, trail, first_signed)
    _check_end(report, head, last)
    return report


def _check_end(report: VerifyReport, head: AuditHead | None, last: AuditRow | None) -> None:
    """The signed head names the last record: none dropped after it, none appended without the key."""
    if head is None:
        if last is not None:
            report.add(f"seq {last.seq}: there is no signed head")
    elif last is None:
        report.add(f"head seq {head.seq}: the trail is empty (all records dropped)")
    elif head.seq > last.seq:
        report.add(f"head seq {head.seq}: the trail ends at seq {last.seq}; the last record(s) were dropped")
    elif head.seq < last.seq:
        report.add(f"seq {head.seq + 1}..{last.seq}: records after the signed head (appended without the key)")
    elif head.hash != last.hash:
        report.add(f"head seq {head.seq}: names another hash than the last record has")


def verify_after(
    storage_audit: AuditRepository,
    public_key: PublicKey | Iterable[PublicKey],
    walked: AuditRow | None,
    on_record: Callable[[AuditRow], None],
    batch: int = 1000,
) -> VerifyReport:
    """Check the records appended since a walk of :func:`verify` that ended at ``walked`` (None: an
    empty trail), handing each to ``on_record``: each links onto the one before as the walk's did, and
    the signed head, read after them, names the last (its signature checked as ``verify`` checks it).
    For a caller that judges something by what the services wrote while it worked (`audit templates`
    leaves a slot those records touch to its next run): records no signed head covers (forged), or
    altered or deleted since they were appended, are problems here, never a reason to look away.
    Checkpoints among them are left to the next ``verify``."""
    report = VerifyReport()
    expected, prev, last = (walked.seq + 1, walked.hash, walked) if walked else (1, None, None)
    head = None
    # The head is committed with the records it names: read after the records, it covers every one a
    # service appended; one it does not cover was written without the key. A head that moved on
    # meanwhile names records appended since the first read: read up to it.
    for _ in range(2):
        try:
            for row in storage_audit.iter_records(from_seq=expected, batch=batch):
                if head is not None and row.seq > head.seq:
                    break
                _check_record(report, row, expected, prev, last, None, {}, None)
                on_record(row)
                expected, prev, last = row.seq + 1, row.hash, row
        except (ValueError, TypeError, OverflowError) as exc:  # a column the database should never hold
            report.add(f"the record after seq {expected - 1} cannot be read ({type(exc).__name__}: {exc}): "
                       "it was changed outside BioGate")
            return report
        if head is not None:
            break
        head = storage_audit.head()
        if head is None or head.seq <= (last.seq if last else 0):
            break
    report.head_seq = head.seq if head else None
    if head is not None:
        trail = trail_keys(storage_audit, public_key)
        bad = _signature_ok(trail, destroyed_at(storage_audit, trail), head.key_id, head.seq, head.signature,
                            head_message(head.seq, head.hash))
        if bad:
            report.add(f"head seq {head.seq}: {bad}")
    _check_end(report, head, last)
    return report


def _check_record(
    report: VerifyReport,
    row: AuditRow,
    expected_seq: int,
    prev: str | None,
    last: AuditRow | None,
    cp: AuditCheckpoint | None,
    external: Mapping[int, set[str]],
    checkpoint_every: int | None,
) -> None:
    report.records_checked += 1
    if row.seq != expected_seq:
        if last is None:
            report.add(f"seq {row.seq}: the trail starts here; records 1..{row.seq - 1} were dropped")
        elif row.seq > expected_seq:
            report.add(f"seq {row.seq}: records {expected_seq}..{row.seq - 1} are missing (deleted)")
        else:
            report.add(f"seq {row.seq}: out of order after seq {last.seq}")
    if row_hash(row) != row.hash:
        report.add(f"seq {row.seq}: content does not match its hash (record modified)")
    if row.prev_hash != prev:
        report.add(
            f"seq {row.seq}: prev_hash does not link to the previous record "
            "(a record was deleted, inserted, reordered or modified)"
        )
    if cp is None and checkpoint_every and row.seq % checkpoint_every == 0:
        report.add(f"seq {row.seq}: its checkpoint is missing")
    if cp is not None and cp.hash != row.hash:
        report.add(f"seq {row.seq}: the checkpoint names another hash than the record has")
    if row.event_type == INTRODUCED and cp is None:
        report.add(f"seq {row.seq}: {INTRODUCED} has no checkpoint: the key before it never vouched for it; it "
                   "introduces no key")
    if row.seq in external and external[row.seq] != {row.hash}:
        report.add(f"seq {row.seq}: does not match the externally kept checkpoint")
