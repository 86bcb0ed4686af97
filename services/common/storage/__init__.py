"""BioGate storage: repositories over SQLite (embedded default) or PostgreSQL, chosen by a DSN.

    storage = open_storage(settings.storage_dsn, settings.storage)
    with storage.transaction():
        storage.subjects.record_consent(consent)
        storage.templates.put(template)

Record types and repository interfaces are in :mod:`.interfaces`; errors in :mod:`.errors`. A
service's own tables are a :class:`StoragePart` (its migrations and repositories) that it attaches:
``storage.attach(part)``.
"""

from .errors import (
    AlreadyExistsError,
    ChallengeError,
    ChallengeExpiredError,
    ChallengeMismatchError,
    ChallengeNotFoundError,
    ChallengeUsedError,
    ConcurrentUpdateError,
    LockHeldError,
    MigrationError,
    NotFoundError,
    StillReferencedError,
    StorageError,
)
from .interfaces import (
    AuditAppend,
    AuditCheckpoint,
    AuditHead,
    AuditRow,
    ChallengeRecord,
    ConsentRecord,
    ErasureCounts,
    PhoneRecord,
    Storage,
    TemplateRecord,
    new_id,
    new_nonce,
)
from .migrate import SchemaPart
from .storage import SqlStorage, StoragePart, open_storage

__all__ = [
    "AlreadyExistsError",
    "AuditAppend",
    "AuditCheckpoint",
    "AuditHead",
    "AuditRow",
    "ChallengeError",
    "ChallengeExpiredError",
    "ChallengeMismatchError",
    "ChallengeNotFoundError",
    "ChallengeRecord",
    "ChallengeUsedError",
    "ConcurrentUpdateError",
    "ConsentRecord",
    "ErasureCounts",
    "LockHeldError",
    "MigrationError",
    "NotFoundError",
    "PhoneRecord",
    "SchemaPart",
    "SqlStorage",
    "StillReferencedError",
    "Storage",
    "StorageError",
    "StoragePart",
    "TemplateRecord",
    "new_id",
    "new_nonce",
    "open_storage",
]
