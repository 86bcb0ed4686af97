-- BioGate MFA schema v5 (SQLite): push confirmation and fraud signals. A bound device may carry
-- the push token of its app (FCM registration token) and a fraud flag (the customer denied a
-- transaction on it); a subject's signals carry when its phone number last changed (the SIM-swap
-- cooling-off) and its latest fraud flag. Keep in step with postgres/0005_push_signals.sql.

ALTER TABLE devices ADD COLUMN push_token TEXT;
ALTER TABLE devices ADD COLUMN flagged_at TEXT;
ALTER TABLE mfa_subject_signals ADD COLUMN phone_changed_at TEXT;
ALTER TABLE mfa_subject_signals ADD COLUMN flagged_at TEXT;
ALTER TABLE mfa_subject_signals ADD COLUMN flag_reason TEXT NOT NULL DEFAULT '';
