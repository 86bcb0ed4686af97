"""KEK rotation and retirement while the services keep running.

``rotate`` adds a new primary KEK (running services see it on their next seal: the file keyring
reloads on change), then re-wraps every template and phone envelope still under an older KEK,
batch by batch, each record by compare-and-swap on (key id, envelope bytes): an enrolment or
phone change that lands in between wins, and its record is simply visited again if it is still
under an old key. Old KEKs stay in the keyring for reading until ``retire`` removes one, which
it refuses while any record still uses it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .envelope import EnvelopeCrypto
from .errors import KeyInUseError, TemplateDecryptionError
from .keyring import KeyInfo, Keyring

if TYPE_CHECKING:
    from services.common.storage.interfaces import Storage

log = logging.getLogger(__name__)

_MAX_ROUNDS = 50  # passes over the remaining records; each pass must make progress


@dataclass
class RewrapReport:
    target_key_id: str
    templates_rewrapped: int = 0
    phones_rewrapped: int = 0
    conflicts: int = 0  # compare-and-swap lost to a concurrent write (the record was revisited)
    failures: dict[str, str] = field(default_factory=dict)  # record -> error class; never silent

    @property
    def ok(self) -> bool:
        return not self.failures


def rewrap_all(storage: Storage, keyring: Keyring, target_key_id: str | None = None, batch: int = 200) -> RewrapReport:
    """Re-wrap every envelope not under ``target_key_id`` (default: the primary) to it."""
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


def rotate(storage: Storage, keyring: Keyring, cipher: str | None = None, batch: int = 200) -> RewrapReport:
    """Add a new primary KEK and move every envelope to it."""
    new = keyring.add_key(cipher)
    log.info("new primary key %s (%s)", new.key_id, new.cipher)
    return rewrap_all(storage, keyring, new.key_id, batch)


def key_usage(storage: Storage) -> Counter[str]:
    """How many templates and phone envelopes are wrapped under each key id (counted by the
    database, no envelope is read)."""
    return Counter(storage.templates.count_by_key()) + Counter(storage.subjects.count_phones_by_key())


def retire(storage: Storage, keyring: Keyring, key_id: str) -> KeyInfo:
    """Remove a KEK from the keyring; refuses while any record is still wrapped under it."""
    info = keyring.key_info(key_id)  # UnknownKeyError for a wrong id
    in_use = key_usage(storage)[key_id]
    if in_use:
        raise KeyInUseError(f"key {key_id!r} still wraps {in_use} record(s); run `biogate keys rotate` first")
    keyring.remove_key(key_id)
    return info
