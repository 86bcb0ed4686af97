"""Errors raised by the storage layer. Callers catch these, never a driver's own exceptions."""

from __future__ import annotations


class StorageError(Exception):
    """Base class; also raised for a database that cannot be opened or reached."""

    sqlstate: str | None = None  # PostgreSQL's error code, where the server raised it


class AlreadyExistsError(StorageError):
    """An insert hit an existing row (same unique key) and replacing was not asked for."""


class NotFoundError(StorageError):
    """The row to update does not exist."""


class ConcurrentUpdateError(StorageError):
    """Optimistic concurrency: the row changed since the caller read it (stale version)."""


class StillReferencedError(StorageError):
    """A row cannot be deleted while other rows (of another owner) still refer to it."""


class LockHeldError(StorageError):
    """A named long-held lock (:meth:`Database.exclusive`) is held by another connection or process."""

    def __init__(self, name: str, holder: str) -> None:
        super().__init__(f"the lock {name!r} is held by {holder}")
        self.name, self.holder = name, holder


class MigrationError(StorageError):
    """The schema in the database does not match the migration files (e.g. an edited migration)."""


class ChallengeError(StorageError):
    """A single-use challenge could not be consumed; the subclass says why."""


class ChallengeNotFoundError(ChallengeError):
    pass


class ChallengeExpiredError(ChallengeError):
    pass


class ChallengeUsedError(ChallengeError):
    pass


class ChallengeMismatchError(ChallengeError):
    """The nonce exists but was issued to another tenant, subject or challenge kind."""
