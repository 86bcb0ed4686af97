-- BioGate schema v2 (SQLite): MFA human review queue, lockout counters and the last trusted
-- context of a subject. Keep in step with postgres/0002_mfa_reviews_lockouts.sql.

CREATE TABLE mfa_reviews (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    subject_id  TEXT NOT NULL,
    session_id  TEXT NOT NULL UNIQUE,
    action      TEXT NOT NULL,
    reasons     TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    created_at  TEXT NOT NULL,
    resolved_at TEXT,
    resolved_by TEXT NOT NULL,
    note        TEXT NOT NULL
);
CREATE INDEX mfa_reviews_queue ON mfa_reviews (tenant_id, status, created_at, id);
CREATE INDEX mfa_reviews_subject ON mfa_reviews (tenant_id, subject_id);

-- one row per counted scope: ('subject', subject id) or ('device', device fingerprint)
CREATE TABLE mfa_lockouts (
    tenant_id       TEXT NOT NULL,
    scope           TEXT NOT NULL CHECK (scope IN ('subject', 'device')),
    key             TEXT NOT NULL,
    subject_id      TEXT NOT NULL,
    failures        INTEGER NOT NULL CHECK (failures >= 0),
    cost            INTEGER NOT NULL CHECK (cost >= 0),
    last_failure_at TEXT,
    locked_at       TEXT,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (tenant_id, scope, key)
);
CREATE INDEX mfa_lockouts_subject ON mfa_lockouts (tenant_id, subject_id);

CREATE TABLE mfa_subject_signals (
    tenant_id  TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    country    TEXT NOT NULL,
    latitude   REAL,
    longitude  REAL,
    seen_at    TEXT NOT NULL,
    PRIMARY KEY (tenant_id, subject_id)
);
