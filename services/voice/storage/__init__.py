"""The voice service's own tables, owned and migrated by the voice service: the replay cache's
sealed capture fingerprints (voice.replay_store: database), so that replicas share them through
the database they already share. They join the shared storage's transactions, so that an erasure
and its audit record commit together."""

from __future__ import annotations

from services.common.storage import SchemaPart, Storage, StoragePart

from .replay import SqlReplayRepository

PART = StoragePart(SchemaPart("voice", __package__), SqlReplayRepository)


def attach(storage: Storage) -> SqlReplayRepository:
    return storage.attach(PART)

