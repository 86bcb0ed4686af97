-- BioGate voice schema v2 (PostgreSQL): `biogate purge` walks the expired fingerprints in batches, each
-- resuming after the last row the one before it chose (services/common/storage/retention.py): the
-- index on their age carries the key too, so that a batch starts where the last one ended.
-- SQLite needs no change (its index holds the rowid): sqlite/0002_purge_keyset.sql is empty.

DROP INDEX voice_replay_age;
CREATE INDEX voice_replay_age ON voice_replay (accepted_at, id);
