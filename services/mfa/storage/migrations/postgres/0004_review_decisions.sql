-- BioGate MFA schema v4 (PostgreSQL): reviews that decide. A review left unresolved past its time
-- is 'expired' (denied); the webhook outbox holds the events for the bank, written in the same
-- transaction as the change they report. Keep in step with sqlite/0004_review_decisions.sql.

ALTER TABLE mfa_reviews DROP CONSTRAINT mfa_reviews_status_check;
ALTER TABLE mfa_reviews ADD CONSTRAINT mfa_reviews_status_check
    CHECK (status IN ('pending', 'approved', 'rejected', 'expired'));
CREATE INDEX mfa_reviews_due ON mfa_reviews (status, created_at);

-- next_attempt_at is NULL once the event is delivered (delivered_at) or abandoned
CREATE TABLE mfa_webhook_outbox (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    attempts        INTEGER NOT NULL CHECK (attempts >= 0),
    next_attempt_at TIMESTAMPTZ,
    delivered_at    TIMESTAMPTZ,
    last_error      TEXT NOT NULL
);
CREATE INDEX mfa_webhook_outbox_due ON mfa_webhook_outbox (next_attempt_at);
CREATE INDEX mfa_webhook_outbox_created ON mfa_webhook_outbox (created_at);
