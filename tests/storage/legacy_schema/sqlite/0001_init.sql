-- BioGate schema v1 (SQLite). Timestamps are UTC text 'YYYY-MM-DD HH:MM:SS.ffffff+00:00';
-- JSON columns are text. Keep in step with postgres/0001_init.sql.

CREATE TABLE subjects (
    tenant_id        TEXT NOT NULL,
    subject_id       TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    -- the phone number, only ever as an envelope encrypted by the caller
    phone_envelope   BLOB,
    phone_key_id     TEXT,
    phone_updated_at TEXT,
    PRIMARY KEY (tenant_id, subject_id),
    CHECK ((phone_envelope IS NULL) = (phone_key_id IS NULL))
);

CREATE TABLE consents (
    tenant_id      TEXT NOT NULL,
    subject_id     TEXT NOT NULL,
    purpose        TEXT NOT NULL,
    modalities     TEXT NOT NULL,
    granted        INTEGER NOT NULL CHECK (granted IN (0, 1)),
    policy_version TEXT NOT NULL,
    evidence_ref   TEXT NOT NULL,
    recorded_at    TEXT NOT NULL,
    withdrawn_at   TEXT,
    PRIMARY KEY (tenant_id, subject_id, purpose),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id)
);

CREATE TABLE templates (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    modality   TEXT NOT NULL,
    model_id   TEXT NOT NULL,
    channel    TEXT NOT NULL,
    envelope   BLOB NOT NULL,
    key_id     TEXT NOT NULL,
    samples    INTEGER NOT NULL CHECK (samples >= 0),
    quality    TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (tenant_id, subject_id, modality, model_id, channel),
    CHECK ((modality = 'face' AND channel = '')
        OR (modality = 'voice' AND channel IN ('wideband', 'telephone'))),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id)
);
CREATE INDEX templates_gallery ON templates (tenant_id, modality, model_id, channel, id);

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

CREATE TABLE challenges (
    nonce       TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    subject_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    consumed_at TEXT
);
CREATE INDEX challenges_subject ON challenges (tenant_id, subject_id);
CREATE INDEX challenges_expires ON challenges (expires_at);

-- one row per key: the current fixed window and its count
CREATE TABLE rate_limits (
    key          TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    window_end   INTEGER NOT NULL,
    count        INTEGER NOT NULL
);
CREATE INDEX rate_limits_window_end ON rate_limits (window_end);

CREATE TABLE audit_records (
    seq               INTEGER PRIMARY KEY CHECK (seq > 0),
    ts                TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    actor             TEXT NOT NULL,
    tenant_id         TEXT,
    subject_pseudonym TEXT,
    details           TEXT NOT NULL,
    prev_hash         TEXT,
    hash              TEXT NOT NULL
);
CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit_records is append-only'); END;
CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit_records is append-only'); END;

CREATE TABLE audit_checkpoints (
    seq       INTEGER PRIMARY KEY REFERENCES audit_records (seq),
    hash      TEXT NOT NULL,
    signature BLOB NOT NULL,
    key_id    TEXT NOT NULL,
    ts        TEXT NOT NULL
);

CREATE TABLE audit_head (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    seq       INTEGER NOT NULL REFERENCES audit_records (seq),
    hash      TEXT NOT NULL,
    signature BLOB NOT NULL,
    key_id    TEXT NOT NULL
);
