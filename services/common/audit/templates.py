"""Which sealed template is the current one: the audit trail names it, ``check_templates`` compares.

An envelope opens only for the subject, modality, model and channel it was sealed for, but an
*older* envelope of the same subject opens too: a database writer (a DBA, a restored backup, an
injection elsewhere) who puts back the template from before a re-enrolment, or one an attacker
enrolled and the bank since replaced, leaves a subject who verifies against it. So every record that
writes a template slot names the digest of the envelope's sealed payload
(:func:`~services.common.crypto.envelope.payload_digest`: stable under key rotation, nothing
biometric): ``<modality>.enrolled`` (enrolment and re-enrolment), ``<modality>.subject_deleted``
(the slots it erased, each with its digest) and ``<modality>.template_attested`` (a template
enrolled before the digests, attested by an operator). The slot is (tenant, subject pseudonym,
modality, model, channel); an erasure empties every slot of its subject and modality.

:func:`check_templates` walks the trail once, verifying the chain as ``biogate audit verify`` does
and keeping each slot's latest audited state in a private temporary SQLite database (flat memory
for millions of slots), then the templates once, in keyset batches. It reports each template whose
payload is not the one its slot's latest record names (rolled back or substituted), each one no live
audited slot accounts for (written outside BioGate, or restored after its erasure), each live
audited slot with no template (deleted outside BioGate), and each unreadable envelope. Templates
whose latest record predates the digests are "unattested", not findings: their rollback cannot be
told; ``attest`` writes one ``template_attested`` record for each, naming the payload stored now.

The services keep writing while it runs: a slot that a record after the walk's end touches is
"written while checking" and left to the next run rather than reported, once those records are
checked as the walk's were (:func:`~.verify.verify_after`); one that fails defers nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.common.crypto.envelope import payload_digest
from services.common.crypto.errors import TamperedEnvelopeError

from .verify import MAX_PROBLEMS, VerifyReport, verify, verify_after

if TYPE_CHECKING:
    from services.common.crypto.signing import PublicKey
    from services.common.privacy import Pseudonymizer
    from services.common.storage.interfaces import AuditRow, Storage, TemplateRecord

    from .log import AuditLog

Slot = tuple[str, str, str, str, str]  # tenant, pseudonym, modality, model, channel
_WRITES = ("enrolled", "template_attested")
_ERASURE = "subject_deleted"
_MODALITIES = ("face", "voice")
MAX_LISTED_UNATTESTED = 20


def slot_details(model_id: str, channel: str, envelope: bytes) -> dict[str, Any]:
    """What an audit record says of the template slot it writes or erases: model, channel (voice)
    and the sealed payload's digest (None for an envelope that no longer parses: erasing it must
    not fail)."""
    try:
        digest: str | None = payload_digest(envelope)
    except TamperedEnvelopeError:
        digest = None
    return {"model_id": model_id, **({"channel": channel} if channel else {}), "payload_digest": digest}


def _describe(slot: Slot) -> str:
    tenant, pseudonym, modality, model, channel = slot
    return f"{tenant}/{pseudonym} {modality} model {model}" + (f" channel {channel}" if channel else "")


@dataclass(frozen=True)
class Finding:
    kind: str  # "rolled-back", "not-audited", "missing", "unreadable"
    slot: Slot
    template_id: str | None  # the row, for the DBA to find it (no subject id in the report)
    text: str

    def render(self) -> str:
        row = f" (template {self.template_id})" if self.template_id else ""
        return f"{self.kind.upper()} {_describe(self.slot)}{row}: {self.text}"


@dataclass
class TemplateReport:
    chain: VerifyReport
    templates_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    more_findings: int = 0
    unattested: int = 0
    unattested_listed: list[str] = field(default_factory=list)
    attested: int = 0
    deferred: int = 0  # findings on slots written while the check ran: the next run judges them

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.findings and not self.more_findings

    def add(self, finding: Finding) -> None:
        if len(self.findings) < MAX_PROBLEMS:
            self.findings.append(finding)
        else:
            self.more_findings += 1

    def render(self) -> str:
        found = len(self.findings) + self.more_findings
        lines = [self.chain.render(),
                 f"templates: {'OK' if not found else 'FAILED'}; {self.templates_checked} checked, {found} findings, "
                 f"{self.unattested} unattested, {self.attested} attested now, {self.deferred} written while checking"]
        if not self.chain.ok:
            lines.append("  the trail did not verify: the audited state the templates were compared with is not "
                         "trustworthy until it does")
        lines += [f"  {f.render()}" for f in self.findings]
        if self.more_findings:
            lines.append(f"  ... and {self.more_findings} more findings")
        lines += [f"  UNATTESTED {u}" for u in self.unattested_listed]
        if self.unattested > len(self.unattested_listed):
            lines.append(f"  ... and {self.unattested - len(self.unattested_listed)} more unattested")
        if self.unattested:
            lines.append("  unattested: enrolled before the audit trail named templates; a rollback of these cannot "
                         "be told (`biogate audit templates --attest-legacy` attests the ones stored now)")
        return "\n".join(lines)


class _Slots:
    """Each slot's latest audited write and each (tenant, pseudonym, modality)'s latest erasure, in a
    private temporary SQLite database (its pages spill to a temporary file beyond the cache)."""

    def __init__(self) -> None:
        self.db = sqlite3.connect("")
        self.db.executescript(
            "CREATE TABLE slots (tenant TEXT, pseudonym TEXT, modality TEXT, model TEXT, channel TEXT,"
            " seq INTEGER NOT NULL, digest TEXT, seen INTEGER NOT NULL DEFAULT 0,"
            " PRIMARY KEY (tenant, pseudonym, modality, model, channel)) WITHOUT ROWID;"
            "CREATE TABLE erased (tenant TEXT, pseudonym TEXT, modality TEXT, seq INTEGER NOT NULL,"
            " PRIMARY KEY (tenant, pseudonym, modality)) WITHOUT ROWID;"
        )
        self._writes: list[tuple[Any, ...]] = []
        self._erasures: list[tuple[Any, ...]] = []
        self.last: AuditRow | None = None  # the walk's last record

    def record(self, row: AuditRow) -> None:
        self.last = row
        change = _slot_change(row)
        if change is None:
            return
        kind, key, digest = change
        if kind == "write":
            self._writes.append((*key, row.seq, digest))
        else:
            self._erasures.append((*key, row.seq))
        if len(self._writes) + len(self._erasures) >= 1000:
            self.flush()

    def flush(self) -> None:
        self.db.executemany(
            "INSERT INTO slots (tenant, pseudonym, modality, model, channel, seq, digest) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET seq = excluded.seq, digest = excluded.digest WHERE excluded.seq > slots.seq",
            self._writes)
        self.db.executemany(
            "INSERT INTO erased (tenant, pseudonym, modality, seq) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET seq = excluded.seq WHERE excluded.seq > erased.seq", self._erasures)
        self._writes, self._erasures = [], []

    def visit(self, slot: Slot) -> tuple[int | None, str | None, int]:
        """(seq of the slot's latest write or None, the digest it names, seq of the latest erasure of
        its subject and modality or 0); marks the slot seen."""
        found = self.db.execute(
            "UPDATE slots SET seen = 1 WHERE tenant = ? AND pseudonym = ? AND modality = ? AND model = ?"
            " AND channel = ? RETURNING seq, digest", slot).fetchone()
        erased = self.db.execute("SELECT seq FROM erased WHERE tenant = ? AND pseudonym = ? AND modality = ?",
                                 slot[:3]).fetchone()
        return (found[0] if found else None), (found[1] if found else None), (erased[0] if erased else 0)

    def unseen_live(self) -> Iterator[tuple[Slot, int]]:
        yield from ((tuple(r[:5]), r[5]) for r in self.db.execute(
            "SELECT s.tenant, s.pseudonym, s.modality, s.model, s.channel, s.seq FROM slots s LEFT JOIN erased e"
            " ON e.tenant = s.tenant AND e.pseudonym = s.pseudonym AND e.modality = s.modality"
            " WHERE s.seen = 0 AND s.seq > COALESCE(e.seq, 0) ORDER BY s.seq"))

    def close(self) -> None:
        self.db.close()


def _slot_change(row: AuditRow) -> tuple[str, tuple[str, ...], str | None] | None:
    """("write", slot, digest) or ("erase", (tenant, pseudonym, modality), None) for a record that
    changes template slots; None for any other."""
    modality, _, what = row.event_type.partition(".")
    if modality not in _MODALITIES or not row.subject_pseudonym or (what not in _WRITES and what != _ERASURE):
        return None
    prefix = (row.tenant_id or "", row.subject_pseudonym, modality)
    if what == _ERASURE:
        return "erase", prefix, None
    try:
        details = json.loads(row.details)
        model, channel, digest = str(details["model_id"]), str(details.get("channel", "")), details.get("payload_digest")
    except (ValueError, KeyError, TypeError):
        return None  # a record the chain check reports as altered, or not one of ours
    return "write", (*prefix, model, channel), digest if isinstance(digest, str) else None


def check_templates(
    storage: Storage,
    public_key: PublicKey | Iterable[PublicKey],
    pseudonymize: Pseudonymizer,
    *,
    known_checkpoints: Iterable[tuple[int, str]] = (),
    checkpoint_every: int | None = None,
    batch: int = 1000,
    attest: Callable[[list[TemplateRecord]], set[str]] | None = None,
) -> TemplateReport:
    """Verify the audit trail and compare every stored template with its slot's latest audited
    write. ``attest(records)``: called, only when the chain verified, with each batch's unattested
    templates; returns the ids of those it attested (:func:`attester`)."""
    slots = _Slots()
    try:
        chain = verify(storage.audit, public_key, known_checkpoints=known_checkpoints,
                       checkpoint_every=checkpoint_every, batch=batch, data_rows=storage.audited_rows(),
                       on_record=slots.record)
        slots.flush()
        report = TemplateReport(chain)
        suspects: list[Finding] = []
        for records in storage.templates.iter_all(batch):
            legacy = []
            for rec in records:
                report.templates_checked += 1
                slot: Slot = (rec.tenant_id, pseudonymize(rec.tenant_id, rec.subject_id), rec.modality, rec.model_id,
                              rec.channel)
                finding = _judge(slots, slot, rec)
                if finding is _UNATTESTED:
                    legacy.append((slot, rec))
                elif finding is not None:
                    suspects.append(finding)
            done = attest([rec for _, rec in legacy]) if attest is not None and legacy and chain.ok else set()
            report.attested += len(done)
            for slot, rec in legacy:
                if rec.id not in done:
                    report.unattested += 1
                    if len(report.unattested_listed) < MAX_LISTED_UNATTESTED:
                        report.unattested_listed.append(f"{_describe(slot)} (template {rec.id})")
        suspects += [Finding("missing", slot, None, f"the audit record at seq {seq} left it holding a template, and "
                                                    "none is stored: deleted outside BioGate")
                     for slot, seq in slots.unseen_live()]
        touched = _touched_after(storage, public_key, slots.last, chain, batch)
        for finding in suspects:
            if finding.slot in touched or finding.slot[:3] in touched:
                report.deferred += 1
            else:
                report.add(finding)
        return report
    finally:
        slots.close()


_UNATTESTED = Finding("unattested", ("", "", "", "", ""), None, "")


def _judge(slots: _Slots, slot: Slot, rec: TemplateRecord) -> Finding | None:
    """The finding on one stored template, ``_UNATTESTED``, or None when it is its slot's audited one."""
    seq, audited, erased = slots.visit(slot)
    try:
        digest = payload_digest(rec.envelope)
    except TamperedEnvelopeError:
        return Finding("unreadable", slot, rec.id, "the envelope does not parse: altered outside BioGate")
    if seq is None:
        why = (f"; its subject's {slot[2]} templates were erased at seq {erased}: restored outside BioGate"
               if erased else ": written outside BioGate")
        return Finding("not-audited", slot, rec.id, "no audit record wrote it" + why)
    if seq < erased:
        return Finding("not-audited", slot, rec.id, f"the audit record at seq {erased} erased it after its write at "
                                                    f"seq {seq}: restored outside BioGate (from a backup?)")
    if audited is None:
        return _UNATTESTED
    if audited != digest:
        return Finding("rolled-back", slot, rec.id, f"its sealed payload is not the one the audit record at seq {seq} "
                                                    "names: an older or another envelope put back outside BioGate")
    return None


def _touched_after(storage: Storage, public_key: PublicKey | Iterable[PublicKey], walked: AuditRow | None,
                   chain: VerifyReport, batch: int) -> set[tuple[str, ...]]:
    """The slots, and the (tenant, pseudonym, modality) erased, of the records appended after the walk,
    checked as the walk's were (:func:`verify_after`): a record that fails (forged, altered, or one of
    them deleted) is the chain's problem, and then none of them defers a finding."""
    touched = set()

    def record(row: AuditRow) -> None:
        change = _slot_change(row)
        if change is not None:
            touched.add(change[1])

    after = verify_after(storage.audit, public_key, walked, record, batch)
    for problem in after.problems:
        chain.add(f"appended while checking: {problem}")
    return touched if after.ok else set()


def attester(storage: Storage, log: AuditLog, actor: str) -> Callable[[list[TemplateRecord]], set[str]]:
    """Attests unattested templates as they are stored now: one ``<modality>.template_attested``
    record each, in one transaction per batch, each template locked and re-read first, so that one
    re-enrolled or erased meanwhile is left alone (its own record names it)."""

    def attest(records: list[TemplateRecord]) -> set[str]:
        done = set()
        with storage.transaction():
            for rec in records:
                now = storage.templates.get_for_update(rec.id)
                if now is None or _key(now) != _key(rec) or (now.envelope != rec.envelope and not _same_payload(now, rec)):
                    continue
                log.append(f"{rec.modality}.template_attested", actor, rec.tenant_id, rec.subject_id,
                           slot_details(rec.model_id, rec.channel, rec.envelope))
                done.add(rec.id)
        return done

    return attest


def _key(rec: TemplateRecord) -> tuple[str, ...]:
    return rec.tenant_id, rec.subject_id, rec.modality, rec.model_id, rec.channel


def _same_payload(a: TemplateRecord, b: TemplateRecord) -> bool:
    """Re-wrapped by a key rotation meanwhile: the same sealed template."""
    try:
        return payload_digest(a.envelope) == payload_digest(b.envelope)
    except TamperedEnvelopeError:
        return False


__all__ = ["Finding", "TemplateReport", "attester", "check_templates", "slot_details"]
