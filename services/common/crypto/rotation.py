"""KEK rotation and retirement while the services keep running.

``rotate`` adds a new primary KEK (running services seal their next record under it: the keyring
reads the primary from the file or the token on every seal), then re-wraps every template and
phone envelope (and those of the sealed tables the caller names: the voice replay fingerprints)
still under an older KEK, batch by batch, each record by compare-and-swap on (key
id, envelope bytes): an enrolment or phone change that lands in between wins, and its record is
simply visited again if it is still under an old key. Old KEKs stay in the keyring for reading
until ``retire`` removes one, which it refuses while any record still uses it.

Key operations on one database are serialised: ``rotate``, ``rewrap_all`` and ``retire`` each hold
the database's key-operation lock (:func:`key_operation`) from start to end, across all their
transactions, and a second one is refused at once with :class:`KeyOperationInProgressError`
naming the holder. Unserialised, two rotations would move records back and forth between their
keys and leave them under the key that is not the primary, and a ``retire`` of the first
rotation's key (no longer the primary, nothing under it yet) could destroy it just before that
rotation swapped a batch of records to it. Running services never take the lock: they read,
enrol and re-enrol throughout.

Audit. The keyring is a file or a token, the audit trail is in the database: no transaction spans
both, so a new key is audited *before* it exists (:mod:`.provision`: ``keys.adding``, then
``keys.added`` or ``keys.add_failed``). ``rotate`` then writes the re-wrap's outcome
(``keys.rotate``, also when it is aborted by an error); a rotation killed mid-way leaves
``keys.adding``/``keys.added`` with no ``keys.rotate`` after them. Records carry ids, ciphers,
counts and error class names, never key material.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .envelope import EnvelopeCrypto, header_key_id
from .errors import KeyInUseError, KeyOperationInProgressError, KeyringError, TemplateDecryptionError
from .keyring import KeyInfo, Keyring
from .provision import KeyAudit, add_kek, audit_failure

if TYPE_CHECKING:
    from services.common.storage.interfaces import Storage

log = logging.getLogger(__name__)

_MAX_ROUNDS = 50  # passes over the remaining records; each pass must make progress
KEY_OPERATION_LOCK = "biogate-key-operations"


@contextmanager
def key_operation(storage: Storage, what: str) -> Iterator[None]:
    """Hold the database's key-operation lock for the block (re-entrant in one thread), or raise
    :class:`KeyOperationInProgressError` at once when another process or connection holds it."""
    from services.common.storage.errors import LockHeldError

    with ExitStack() as stack:
        try:
            stack.enter_context(storage.exclusive(KEY_OPERATION_LOCK, f"keys {what}"))
        except LockHeldError as exc:
            raise KeyOperationInProgressError(
                f"another key operation is in progress on this database ({exc.holder}); nothing was "
                f"changed: run `keys {what}` again when it has finished"
            ) from None
        yield


def sealed_key_id(envelope: bytes, size: int | None = None) -> str:
    """The key id in a sealed record's header, for counting and re-wrapping records whose key id is in
    no column; "" for one that is not an envelope (counted under no key, reported by the re-wrap).
    ``size``: the record's, when ``envelope`` is only its first bytes (its header at least)."""
    try:
        return header_key_id(envelope, len(envelope) if size is None else size)
    except TemplateDecryptionError:
        return ""


@dataclass(frozen=True)
class SealedTable:
    """Sealed data a service keeps in a table (or another store) of its own, re-wrapped by rotation
    like the templates: ``fetch(target, batch, after)`` the next records (each with ``.envelope``) not
    under ``target`` after the cursor (None: from the start; an empty list: no more), ``cursor(record)``,
    ``swap(record, envelope)`` a compare-and-swap on the record's envelope; ``name(record)`` how a
    failure names it (default: its cursor, when that is unique per record)."""

    what: str  # singular: "voice replay fingerprint"
    fetch: Callable[[str, int, Any], list[Any]]
    cursor: Callable[[Any], Any]
    swap: Callable[[Any, bytes], bool]
    name: Callable[[Any], str] | None = None


@dataclass
class RewrapReport:
    target_key_id: str
    templates_rewrapped: int = 0
    phones_rewrapped: int = 0
    others_rewrapped: dict[str, int] = field(default_factory=dict)  # SealedTable.what -> count
    conflicts: int = 0  # compare-and-swap lost to a concurrent write (the record was revisited)
    failures: dict[str, str] = field(default_factory=dict)  # record -> error class; never silent

    @property
    def ok(self) -> bool:
        return not self.failures


def rewrap_all(
    storage: Storage,
    keyring: Keyring,
    target_key_id: str | None = None,
    batch: int = 200,
    audit: KeyAudit | None = None,
    tables: Sequence[SealedTable] = (),
) -> RewrapReport:
    """Re-wrap every envelope not under ``target_key_id`` (default: the primary) to it, holding
    the key-operation lock; ``keys.rewrap`` (the outcome) is audited before the lock is let go."""
    with key_operation(storage, "rotate"):
        target = target_key_id or keyring.primary_key_id()
        try:
            report = _rewrap_all(storage, keyring, target, batch, tables)
        except BaseException as exc:
            audit_failure(audit, "keys.rewrap", {"key_id": target, "outcome": "aborted"}, exc)
            raise
        if audit is not None:
            audit("keys.rewrap", _outcome(report))
        return report


def _outcome(report: RewrapReport) -> dict[str, Any]:
    return {
        "key_id": report.target_key_id,
        "outcome": "done" if report.ok else "failures",
        "templates_rewrapped": report.templates_rewrapped,
        "phones_rewrapped": report.phones_rewrapped,
        **({"others_rewrapped": report.others_rewrapped} if report.others_rewrapped else {}),
        "failures": len(report.failures),
    }


def _rewrap_all(
    storage: Storage, keyring: Keyring, target_key_id: str | None, batch: int, tables: Sequence[SealedTable] = ()
) -> RewrapReport:
    crypto = EnvelopeCrypto(keyring)
    target = target_key_id or keyring.primary_key_id()
    report = RewrapReport(target)
    templates, subjects = storage.templates, storage.subjects
    report.templates_rewrapped = _rewrap_table(
        crypto, target, report, storage.transaction,
        fetch=lambda after: templates.iter_for_rewrap(target, batch, after_id=after or ""),
        cursor=lambda r: r.id,
        name=lambda r: f"template {r.id}",
        swap=lambda r, new: templates.replace_envelope(r.id, r.key_id, new, target, expected_envelope=r.envelope),
    )  # fmt: skip
    report.phones_rewrapped = _rewrap_table(
        crypto, target, report, storage.transaction,
        fetch=lambda after: subjects.iter_phones_for_rewrap(target, batch, after=after or ("", "")),
        cursor=lambda r: (r.tenant_id, r.subject_id),
        name=lambda r: f"phone of {r.tenant_id}/{r.subject_id}",
        swap=lambda r, new: subjects.replace_phone_envelope(
            r.tenant_id, r.subject_id, r.key_id, new, target, expected_envelope=r.envelope
        ),
    )  # fmt: skip
    for t in tables:
        report.others_rewrapped[t.what] = _rewrap_table(
            crypto, target, report, storage.transaction,
            fetch=lambda after, t=t: t.fetch(target, batch, after), cursor=t.cursor,  # type: ignore[misc]
            name=lambda r, t=t: f"{t.what} {t.name(r) if t.name else t.cursor(r)}", swap=t.swap,  # type: ignore[misc]
        )  # fmt: skip
    log.info(
        "re-wrapped %d templates and %d phone numbers to %s (%d conflicts, %d failures)",
        report.templates_rewrapped, report.phones_rewrapped, target, report.conflicts, len(report.failures),
    )
    return report


def _rewrap_table(
    crypto: EnvelopeCrypto,
    target: str,
    report: RewrapReport,
    transaction: Callable[[], AbstractContextManager[Any]],
    fetch: Callable[[Any], list[Any]],
    cursor: Callable[[Any], Any],
    name: Callable[[Any], str],
    swap: Callable[[Any, bytes], bool],
) -> int:
    """Passes over the records not under ``target`` until one pass changes nothing.

    The crypto runs outside any transaction; each batch's swaps are one short transaction.
    """
    done = 0
    for _ in range(_MAX_ROUNDS):
        after, progressed, seen = None, False, False
        while recs := fetch(after):
            todo = [r for r in recs if name(r) not in report.failures]
            seen = seen or bool(todo)
            rewrapped = [(r, _rewrap_one(crypto, r.envelope, target, name(r), report)) for r in todo]
            with transaction():
                swapped = [swap(r, new) for r, new in rewrapped if new is not None]
            done += sum(swapped)
            progressed = progressed or any(swapped)
            # A lost swap means a concurrent write won; the next pass sees the record as it is now.
            report.conflicts += swapped.count(False)
            after = cursor(recs[-1])
        if not seen or not progressed:
            break
    return done


def _rewrap_one(crypto: EnvelopeCrypto, envelope: bytes, target: str, name: str, report: RewrapReport) -> bytes | None:
    try:
        return crypto.rewrap(envelope, target)
    except TemplateDecryptionError as exc:
        report.failures[name] = f"{type(exc).__name__}: {exc}"
        log.error("cannot re-wrap %s: %s", name, report.failures[name])
        return None


def rotate(
    storage: Storage,
    keyring: Keyring,
    cipher: str | None = None,
    batch: int = 200,
    audit: KeyAudit | None = None,
    tables: Sequence[SealedTable] = (),
) -> RewrapReport:
    """Add a new primary KEK and move every envelope to it, holding the key-operation lock
    throughout; the audit records (:func:`.provision.add_kek`'s, then ``keys.rotate`` with the outcome) are
    written before the lock is let go."""
    with key_operation(storage, "rotate"):
        new = add_kek(audit, "rotate", cipher, lambda key_id: keyring.add_key(cipher, key_id=key_id))
        log.info("new primary key %s (%s)", new.key_id, new.cipher)
        try:
            report = _rewrap_all(storage, keyring, new.key_id, batch, tables)
        except BaseException as exc:
            audit_failure(audit, "keys.rotate", {"key_id": new.key_id, "outcome": "aborted"}, exc)
            raise
        if audit is not None:
            audit("keys.rotate", _outcome(report))
        return report


def key_usage(storage: Storage) -> Counter[str]:
    """How many templates and phone envelopes are wrapped under each key id (counted by the
    database, no envelope is read)."""
    return Counter(storage.templates.count_by_key()) + Counter(storage.subjects.count_phones_by_key())


def retire(
    storage: Storage,
    keyring: Keyring,
    key_id: str,
    audit: Callable[[KeyInfo], None] | None = None,
    kept_elsewhere: Callable[[], Mapping[str, tuple[Counter[str], str]]] | None = None,
    kept_outside: Callable[[], Mapping[str, tuple[Counter[str], str]]] | None = None,
) -> KeyInfo:
    """Remove a KEK from the keyring; refuses while any record is still wrapped under it, and while
    another key operation (a rotation) runs.

    ``kept_elsewhere``: sealed data a service keeps for a limited time outside templates and phones
    (voice replay fingerprints; one stored after a rotation's last pass is still under the old key):
    {what: (count per key id, how long it is kept)}. Retiring the key under which some still are
    would make the service fail on them until they expire.

    The count, ``audit(info)`` (the audit record) and the removal are one transaction: a removal
    that fails rolls the audit record back, and on SQLite no enrolment commits between the count
    and the removal. ``kept_outside``: the same for data outside the database (a Redis replay store),
    counted before that transaction: no database transaction covers it, and on SQLite holding the
    write lock through a count of seconds would stall every service's audited write (a record stored
    there under the key after the count is left out as expired by its service, never an error).
    """
    with key_operation(storage, "retire"):
        info = keyring.key_info(key_id)  # UnknownKeyError for a wrong id
        _refuse_if_sealed(key_id, kept_outside)
        with storage.transaction():
            templates = storage.templates.count_by_key().get(key_id, 0)
            phones = storage.subjects.count_phones_by_key().get(key_id, 0)
            if templates or phones:
                in_use = f"key {key_id!r} still wraps {templates + phones} record(s)"
                if key_id == keyring.primary_key_id():
                    raise KeyInUseError(f"{in_use}; run `biogate keys rotate` first")
                raise KeyInUseError(
                    f"{in_use} ({templates} templates, {phones} phone numbers) that no rotation moved: written "
                    "under it after the rotation's last pass (sealed just before the new primary was added), or "
                    "not re-wrappable (`keys rotate` listed those as FAILED); run `biogate keys rewrap` to move "
                    "them to the primary, then retire again"
                )
            if key_id == keyring.primary_key_id():
                raise KeyringError(f"key {key_id!r} is the primary; rotate before retiring it")
            _refuse_if_sealed(key_id, kept_elsewhere)
            if audit is not None:
                audit(info)
            keyring.remove_key(key_id)
        return info


def _refuse_if_sealed(key_id: str, kept: Callable[[], Mapping[str, tuple[Counter[str], str]]] | None) -> None:
    for what, (counts, how_long) in (kept() if kept else {}).items():
        if counts.get(key_id):
            raise KeyInUseError(
                f"key {key_id!r} still seals {counts[key_id]} {what}(s), kept {how_long} and not "
                "re-wrapped since: run `biogate keys rewrap`, or retire it once they are gone"
            )
