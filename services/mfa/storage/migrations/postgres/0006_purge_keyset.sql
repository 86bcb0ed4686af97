-- BioGate MFA schema v6 (PostgreSQL): `biogate purge` walks each table's expired rows in batches, each
-- resuming after the last row the one before it chose (services/common/storage/retention.py): the
-- indexes on the expiry column carry the key too, so that a batch starts where the last one ended.
-- SQLite needs no change (its index holds the rowid): sqlite/0006_purge_keyset.sql is empty.

DROP INDEX otp_challenges_expires;
CREATE INDEX otp_challenges_expires ON otp_challenges (expires_at, id);
DROP INDEX auth_sessions_expires;
CREATE INDEX auth_sessions_expires ON auth_sessions (expires_at, id);
DROP INDEX mfa_webhook_outbox_created;
CREATE INDEX mfa_webhook_outbox_created ON mfa_webhook_outbox (created_at, id);
