-- BioGate MFA schema v1 (SQLite): bound devices, SMS OTP codes, authentication sessions.
-- Until the MFA owned its tables the shared schema's first migration created them: where that ran,
-- this one is recorded without running. Keep in step with postgres/0001_init.sql.
-- legacy: 0001_init

CREATE TABLE devices (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL,
    subject_id   TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    attributes   TEXT NOT NULL,
    public_key   BLOB,
    label        TEXT NOT NULL,
    platform     TEXT NOT NULL,
    bound_at     TEXT NOT NULL,
    last_seen_at TEXT,
    revoked_at   TEXT,
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id)
);
CREATE INDEX devices_subject ON devices (tenant_id, subject_id);
CREATE UNIQUE INDEX devices_active_fingerprint ON devices (tenant_id, subject_id, fingerprint)
    WHERE revoked_at IS NULL;

CREATE TABLE otp_challenges (
    id           TEXT PRIMARY KEY,
    session_id   TEXT NOT NULL,
    tenant_id    TEXT NOT NULL,
    subject_id   TEXT NOT NULL,
    code_hash    TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    attempts     INTEGER NOT NULL CHECK (attempts >= 0),
    max_attempts INTEGER NOT NULL CHECK (max_attempts > 0),
    sent_at      TEXT NOT NULL,
    consumed_at  TEXT
);
CREATE INDEX otp_challenges_session ON otp_challenges (session_id, sent_at);
CREATE INDEX otp_challenges_subject ON otp_challenges (tenant_id, subject_id);
CREATE INDEX otp_challenges_expires ON otp_challenges (expires_at);

CREATE TABLE auth_sessions (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    version    INTEGER NOT NULL CHECK (version > 0)
);
CREATE INDEX auth_sessions_subject ON auth_sessions (tenant_id, subject_id);
CREATE INDEX auth_sessions_expires ON auth_sessions (expires_at);
