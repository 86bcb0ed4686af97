-- BioGate shared schema v5 (SQLite): the audit key destructions (`biogate audit destroy-key`) in one
-- index seek each, not a scan of the trail; every service looks them up each audit.key_check_s to stop
-- signing with a key the trail says was destroyed. Partial: the other appends write no index entry.
-- Keep in step with postgres/0005_audit_key_destructions.sql.

CREATE INDEX audit_records_key_destroyed ON audit_records (seq) WHERE event_type = 'audit.key_destroyed';
