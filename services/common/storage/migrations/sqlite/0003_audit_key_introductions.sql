-- BioGate shared schema v3 (SQLite): the audit key introductions (`biogate audit new-key`) in one
-- index seek each, not a scan of the trail; a service looks them up under the audit lock when it
-- meets a head signed by a new key. Partial: the other appends write no index entry.
-- Keep in step with postgres/0003_audit_key_introductions.sql.

CREATE INDEX audit_records_key_introduced ON audit_records (seq) WHERE event_type = 'audit.key_introduced';
