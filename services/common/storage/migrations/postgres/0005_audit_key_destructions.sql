-- BioGate shared schema v5 (PostgreSQL): the audit key destructions (`biogate audit destroy-key`) in one
-- index seek each, not a scan of the trail; every service looks them up each audit.key_check_s to stop
-- signing with a key the trail says was destroyed. Partial: the other appends write no index entry.
-- Built CONCURRENTLY: audit_records takes every audited write, which a plain build would hold.
-- Keep in step with sqlite/0005_audit_key_destructions.sql.
-- biogate: no-transaction

CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_records_key_destroyed ON audit_records (seq)
    WHERE event_type = 'audit.key_destroyed';
