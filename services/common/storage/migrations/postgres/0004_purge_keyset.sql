-- BioGate shared schema v4 (PostgreSQL): `biogate purge` walks each table's expired rows in batches, each
-- resuming after the last row the one before it chose (services/common/storage/retention.py): the
-- indexes on the expiry column carry the key too, so that a batch starts where the last one ended.
-- SQLite needs no change (its index holds the rowid): sqlite/0004_purge_keyset.sql is empty.

DROP INDEX challenges_expires;
CREATE INDEX challenges_expires ON challenges (expires_at, nonce);
DROP INDEX rate_limits_window_end;
CREATE INDEX rate_limits_window_end ON rate_limits (window_end, key);
