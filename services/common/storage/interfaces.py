"""What the shared storage stores (frozen record types) and the repository interfaces (Protocols).

These are the tables every service uses: subjects with consent and contact, templates, challenges,
rate limits, the audit trail. A service's own tables are its own (see :class:`StoragePart`).
Services depend on these names only; :func:`services.common.storage.open_storage` returns an
object satisfying :class:`Storage`. Every timestamp is a timezone-aware UTC ``datetime``. Binary
secrets (template and phone envelopes) are encrypted by the caller: the storage never sees
plaintext biometric data or phone numbers.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from .db import utcnow

if TYPE_CHECKING:
    from services.common.config import RetentionConfig

    from .retention import Expiry
    from .storage import StoragePart

Modality = Literal["face", "voice"]
P = TypeVar("P")


def new_id() -> str:
    return uuid.uuid4().hex


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateRecord:
    tenant_id: str
    subject_id: str
    modality: Modality
    model_id: str
    channel: str  # '' for face; 'wideband' or 'telephone' for voice
    envelope: bytes
    key_id: str
    samples: int
    quality: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class ConsentRecord:
    """Mirrors biogate.v1.Consent; purpose is e.g. 'biometric_verification'."""

    tenant_id: str
    subject_id: str
    purpose: str
    modalities: tuple[Modality, ...]
    policy_version: str
    evidence_ref: str = ""
    granted: bool = True
    recorded_at: datetime = field(default_factory=utcnow)
    withdrawn_at: datetime | None = None


@dataclass(frozen=True)
class PhoneRecord:
    tenant_id: str
    subject_id: str
    envelope: bytes
    key_id: str


@dataclass(frozen=True)
class ChallengeRecord:
    tenant_id: str
    subject_id: str  # '' when the challenge is not bound to a subject (1:N identification)
    kind: str  # e.g. 'liveness', 'digits'
    payload: Mapping[str, Any]
    expires_at: datetime
    nonce: str = field(default_factory=new_nonce)
    created_at: datetime = field(default_factory=utcnow)
    consumed_at: datetime | None = None


@dataclass(frozen=True)
class AuditRow:
    seq: int
    ts: datetime
    event_type: str
    actor: str
    tenant_id: str | None
    subject_pseudonym: str | None
    details: str  # JSON text, stored byte for byte (the hash covers it)
    prev_hash: str | None
    hash: str


@dataclass(frozen=True)
class AuditCheckpoint:
    seq: int
    hash: str
    signature: bytes
    key_id: str
    ts: datetime


@dataclass(frozen=True)
class AuditHead:
    seq: int
    hash: str
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class AuditAppend:
    """What an audit builder returns: the row, and optionally the new head and a checkpoint. The
    head may be given as the function that signs it (``sign_head``): the storage calls it only for
    the last record of a commit, whose head supersedes the others' in the same transaction (a
    signature is a round trip to a network HSM, made while every other append waits)."""

    row: AuditRow
    head: AuditHead | None = None
    checkpoint: AuditCheckpoint | None = None
    sign_head: Callable[[], AuditHead] | None = None


@dataclass(frozen=True)
class ErasureCounts:
    """What erasing a subject's shared record removed."""

    challenges: int
    consents: int
    contact_erased: bool


# --- repositories --------------------------------------------------------------------------------


class TemplateRepository(Protocol):
    def put(self, rec: TemplateRecord, replace: bool = False) -> TemplateRecord:
        """Insert, or with replace=True overwrite the envelope of the same (tenant, subject,
        modality, model, channel), keeping its id and created_at. Raises AlreadyExistsError."""

    def get(
        self, tenant_id: str, subject_id: str, modality: Modality, model_id: str, channel: str = ""
    ) -> TemplateRecord | None: ...

    def list_for_subject(
        self, tenant_id: str, subject_id: str, modality: Modality | None = None
    ) -> list[TemplateRecord]: ...

    def iter_gallery(
        self,
        tenant_id: str,
        modality: Modality,
        model_id: str,
        channel: str = "",
        batch: int = 1000,
        consent: str | None = None,
    ) -> Iterator[list[TemplateRecord]]:
        """Every template of a gallery in batches, each read on its own (no long transaction).
        With `consent` (a purpose), only the templates of subjects with an active consent of
        that purpose that lists the modality; likewise in count_gallery."""

    def count_gallery(
        self,
        tenant_id: str,
        modality: Modality,
        model_id: str,
        channel: str = "",
        consent: str | None = None,
    ) -> int: ...

    def gallery_version(
        self, tenant_id: str, modality: Modality, model_id: str, channel: str = ""
    ) -> tuple[int, datetime | None]:
        """(count, latest updated_at) of a gallery: any enrolment, erasure or re-enrolment
        changes it."""

    def delete_for_subject(
        self, tenant_id: str, subject_id: str, modality: Modality | None = None
    ) -> int: ...

    def erase_for_subject(
        self, tenant_id: str, subject_id: str, modality: Modality | None = None
    ) -> list[TemplateRecord]:
        """Delete the subject's templates (of one modality); the records deleted."""

    def iter_all(self, batch: int = 1000) -> Iterator[list[TemplateRecord]]:
        """Every template, in batches of at most ``batch`` ordered by id (keyset pagination)."""

    def get_for_update(self, id: str) -> TemplateRecord | None:
        """The template of row ``id``, locked against other writers until the transaction ends."""

    def iter_for_rewrap(
        self, exclude_key_id: str, batch: int, after_id: str = ""
    ) -> list[TemplateRecord]:
        """Up to `batch` templates not wrapped with `exclude_key_id`, ordered by id after `after_id`."""

    def count_by_key(self) -> dict[str, int]:
        """How many templates each key id wraps (counted in the database)."""

    def replace_envelope(
        self,
        id: str,
        expected_key_id: str,
        new_envelope: bytes,
        new_key_id: str,
        expected_envelope: bytes | None = None,
    ) -> bool:
        """Compare-and-swap: False when the row is gone or no longer under expected_key_id
        (and, when given, no longer holds expected_envelope)."""


class SubjectRepository(Protocol):
    def record_consent(self, consent: ConsentRecord) -> ConsentRecord:
        """The consent for (tenant, subject, purpose), replacing the previous one."""

    def withdraw_consent(
        self, tenant_id: str, subject_id: str, purpose: str, now: datetime | None = None
    ) -> ConsentRecord | None: ...

    def get_consents(self, tenant_id: str, subject_id: str) -> list[ConsentRecord]: ...

    def has_active_consent(
        self, tenant_id: str, subject_id: str, purpose: str, modality: Modality
    ) -> bool: ...

    def consenting(
        self, tenant_id: str, purpose: str, modality: Modality, subject_ids: Sequence[str]
    ) -> set[str]:
        """Those of `subject_ids` with an active consent of `purpose` that lists `modality`."""

    def consent_changed_at(self, tenant_id: str, purpose: str) -> datetime | None:
        """The latest recording or withdrawal of a consent of this purpose in the tenant."""

    def set_phone(self, tenant_id: str, subject_id: str, envelope: bytes, key_id: str) -> None: ...

    def get_phone(self, tenant_id: str, subject_id: str) -> tuple[bytes, str] | None: ...

    def iter_phones_for_rewrap(
        self, exclude_key_id: str, batch: int, after: tuple[str, str] = ("", "")
    ) -> list[PhoneRecord]: ...

    def count_phones_by_key(self) -> dict[str, int]:
        """How many phone envelopes each key id wraps (counted in the database)."""

    def replace_phone_envelope(
        self,
        tenant_id: str,
        subject_id: str,
        expected_key_id: str,
        new_envelope: bytes,
        new_key_id: str,
        expected_envelope: bytes | None = None,
    ) -> bool: ...


class RateLimitRepository(Protocol):
    def hit(
        self, key: str, window_s: int, limit: int, now: datetime | None = None
    ) -> tuple[bool, int]:
        """Count one event in key's current fixed window: (count <= limit, count)."""

    def count(self, key: str, window_s: int, now: datetime | None = None) -> int:
        """Events counted in key's current fixed window, without counting one."""

    def reset(self, key: str) -> bool: ...


class ChallengeRepository(Protocol):
    def create(self, rec: ChallengeRecord) -> ChallengeRecord: ...

    def consume(
        self, nonce: str, tenant_id: str, subject_id: str, kind: str, now: datetime | None = None
    ) -> Mapping[str, Any]:
        """Use the challenge once and return its payload. Raises ChallengeNotFoundError,
        ChallengeMismatchError, ChallengeUsedError or ChallengeExpiredError."""

    def delete_for_subject(self, tenant_id: str, subject_id: str) -> int: ...


AuditBuilder = Callable[[int, "str | None"], "AuditAppend | AuditRow"]
# check(head, last_seq, last_hash): the stored signed head and the last record (0, None: none),
# read under the append lock; raises to refuse appending onto that tail.
AuditTailCheck = Callable[["AuditHead | None", int, "str | None"], None]


class AuditRepository(Protocol):
    def append(self, build: AuditBuilder, check_tail: AuditTailCheck | None = None) -> AuditRow:
        """Serialised against every other append: build(next_seq, prev_hash) runs while the lock
        is held (perhaps on another appending thread, whose transaction writes the appends that
        waited for it together) and its row (plus optional head and checkpoint) is written in that
        transaction; inside a caller's write transaction, in the caller's. ``check_tail`` first
        judges the tail the group is chained onto; what it raises is its caller's error."""

    def last(self) -> AuditRow | None: ...

    def head(self) -> AuditHead | None: ...

    def checkpoints(self) -> list[AuditCheckpoint]: ...

    def iter_checkpoints(self, after_seq: int = 0, batch: int = 1000) -> Iterator[AuditCheckpoint]:
        """The checkpoints after ``after_seq`` in seq order, read ``batch`` at a time."""

    def checkpoint_before(self, ts: datetime) -> AuditCheckpoint | None:
        """The checkpoint of the highest seq whose time is ``ts`` or earlier (times need not follow
        seq: replicas' clocks differ), or None."""

    def checkpointed(self, event_type: str) -> list[tuple[AuditRow, AuditCheckpoint]]:
        """The records of ``event_type`` that have a checkpoint at their seq, each with it, in seq
        order, not a walk of the trail: for ``audit.key_introduced`` one index seek each (a partial
        index), for another type one lookup per checkpoint."""

    def hashes(self, seqs: Iterable[int]) -> dict[int, str]:
        """The hash of the record at each of ``seqs`` the trail holds (point lookups)."""

    def iter_records(self, from_seq: int = 1, batch: int = 1000) -> Iterator[AuditRow]: ...


class Storage(Protocol):
    # Read-only members: an implementation may hold more specific repositories.
    @property
    def templates(self) -> TemplateRepository: ...
    @property
    def subjects(self) -> SubjectRepository: ...
    @property
    def rate_limits(self) -> RateLimitRepository: ...
    @property
    def challenges(self) -> ChallengeRepository: ...
    @property
    def audit(self) -> AuditRepository: ...

    def transaction(self) -> AbstractContextManager[Storage]:
        """Every repository call made inside the block (in this thread) is one transaction,
        attached parts' included."""

    def exclusive(self, name: str, what: str) -> AbstractContextManager[None]:
        """Hold the named lock for the block, across transactions, against every other process
        and connection on this database; :class:`~.errors.LockHeldError` (naming the holder) at
        once when another holds it. Others keep reading and writing meanwhile."""

    def attach(self, part: StoragePart[P]) -> P:
        """A service's own tables on this storage's database: migrated at the first attach."""

    def erase_subject(self, tenant_id: str, subject_id: str) -> ErasureCounts:
        """The subject's consents, contact, challenges and subject row. Raises StillReferencedError
        while templates remain (the modality services erase those); a service erases its own
        tables' rows first, in the same transaction."""

    def expiries(self, cfg: RetentionConfig, now: datetime | None = None) -> list[Expiry]:
        """The shared tables' rows past their retention (challenges, rate-limit windows), for
        :func:`~.retention.purge`."""

    def audited_rows(self) -> dict[str, int]:
        """Counts of the rows only ever written with an audit record (templates, consents, phone
        numbers): the audit verification's evidence that a trail should not be empty."""

    def close(self) -> None: ...
