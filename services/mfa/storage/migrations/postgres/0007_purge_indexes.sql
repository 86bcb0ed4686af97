-- BioGate MFA schema v7 (PostgreSQL): an index on the column each kind of `biogate purge` bounds,
-- then its key (services/mfa/storage/__init__.py, expiries), so that a batch seeks its rows rather
-- than scanning the table: resolved reviews, lockout counters, revoked devices, and the delivered
-- or abandoned webhook events (the only rows the purge reads there; the outbox's index of due
-- events leaves them out).
-- Keep in step with sqlite/0007_purge_indexes.sql (SQLite's indexes hold the rowid instead of the key).

CREATE INDEX mfa_reviews_resolved ON mfa_reviews (resolved_at, id);
CREATE INDEX mfa_lockouts_updated ON mfa_lockouts (updated_at, tenant_id, scope, key);
CREATE INDEX devices_revoked ON devices (revoked_at, id) WHERE revoked_at IS NOT NULL;
DROP INDEX mfa_webhook_outbox_created;
DROP INDEX mfa_webhook_outbox_due;
CREATE INDEX mfa_webhook_outbox_due ON mfa_webhook_outbox (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX mfa_webhook_outbox_settled ON mfa_webhook_outbox (created_at, id) WHERE next_attempt_at IS NULL;
