-- BioGate MFA schema v4 (SQLite): reviews that decide. A review left unresolved past its time is
-- 'expired' (denied); the webhook outbox holds the events for the bank, written in the same
-- transaction as the change they report. SQLite cannot alter a CHECK constraint: the review
-- table is rebuilt. Keep in step with postgres/0004_review_decisions.sql.

CREATE TABLE mfa_reviews_v4 (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    subject_id  TEXT NOT NULL,
    session_id  TEXT NOT NULL UNIQUE,
    action      TEXT NOT NULL,
    reasons     TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'expired')),
    created_at  TEXT NOT NULL,
    resolved_at TEXT,
    resolved_by TEXT NOT NULL,
    note        TEXT NOT NULL
);
INSERT INTO mfa_reviews_v4 (id, tenant_id, subject_id, session_id, action, reasons, status, created_at,
                            resolved_at, resolved_by, note)
    SELECT id, tenant_id, subject_id, session_id, action, reasons, status, created_at, resolved_at,
           resolved_by, note FROM mfa_reviews;
DROP TABLE mfa_reviews;
ALTER TABLE mfa_reviews_v4 RENAME TO mfa_reviews;
CREATE INDEX mfa_reviews_queue ON mfa_reviews (tenant_id, status, created_at, id);
CREATE INDEX mfa_reviews_subject ON mfa_reviews (tenant_id, subject_id);
CREATE INDEX mfa_reviews_due ON mfa_reviews (status, created_at);

-- next_attempt_at is NULL once the event is delivered (delivered_at) or abandoned
CREATE TABLE mfa_webhook_outbox (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL CHECK (attempts >= 0),
    next_attempt_at TEXT,
    delivered_at    TEXT,
    last_error      TEXT NOT NULL
);
CREATE INDEX mfa_webhook_outbox_due ON mfa_webhook_outbox (next_attempt_at);
CREATE INDEX mfa_webhook_outbox_created ON mfa_webhook_outbox (created_at);
