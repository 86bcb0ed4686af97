-- The voice service's own schema v1 (SQLite): the voice replay cache's sealed capture fingerprints, so that
-- replicas share them with no service beside the database (voice.replay_store: database).
-- Keep in step with postgres/0001_replay.sql.

CREATE TABLE voice_replay (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id   TEXT NOT NULL,
    subject_key TEXT NOT NULL,  -- the subject's keyed pseudonym, never its id
    accepted_at REAL NOT NULL,  -- Unix seconds
    record      BLOB NOT NULL   -- a fingerprint sealed by the envelope encryption
);
CREATE INDEX voice_replay_subject ON voice_replay (tenant_id, subject_key, accepted_at);
CREATE INDEX voice_replay_age ON voice_replay (accepted_at);
