"""BioGate storage: repositories over SQLite (embedded default) or PostgreSQL, chosen by a DSN.

    storage = open_storage(settings.storage_dsn, settings.storage)
    with storage.transaction():
        storage.subjects.record_consent(consent)
        storage.templates.put(template)

Record types and repository interfaces are in :mod:`.interfaces`; errors in :mod:`.errors`.
"""

from .errors import (
    AlreadyExistsError,
    ChallengeError,
    ChallengeExpiredError,
    ChallengeMismatchError,
    ChallengeNotFoundError,
    ChallengeUsedError,
    ConcurrentUpdateError,
    MigrationError,
    NotFoundError,
    StorageError,
)
from .interfaces import (
    AuditAppend,
    AuditCheckpoint,
    AuditHead,
    AuditRow,
    AuthSessionRecord,
    ChallengeRecord,
    ConsentRecord,
    DeviceRecord,
    ErasureCounts,
    OtpRecord,
    PhoneRecord,
    Storage,
    TemplateRecord,
    new_id,
    new_nonce,
)
from .storage import SqlStorage, open_storage

__all__ = [
    "AlreadyExistsError",
    "AuditAppend",
    "AuditCheckpoint",
    "AuditHead",
    "AuditRow",
    "AuthSessionRecord",
    "ChallengeError",
    "ChallengeExpiredError",
    "ChallengeMismatchError",
    "ChallengeNotFoundError",
    "ChallengeRecord",
    "ChallengeUsedError",
    "ConcurrentUpdateError",
    "ConsentRecord",
    "DeviceRecord",
    "ErasureCounts",
    "MigrationError",
    "NotFoundError",
    "OtpRecord",
    "PhoneRecord",
    "SqlStorage",
    "Storage",
    "StorageError",
    "TemplateRecord",
    "new_id",
    "new_nonce",
    "open_storage",
]
