-- BioGate shared schema v2 (SQLite): the latest recording and withdrawal of a tenant's consents
-- of one purpose in two index seeks (what a face gallery polls before each 1:N search).
-- Keep in step with postgres/0002_consent_changes.sql.
-- legacy: 0003_consent_changes

CREATE INDEX consents_recorded ON consents (tenant_id, purpose, recorded_at);
CREATE INDEX consents_withdrawn ON consents (tenant_id, purpose, withdrawn_at);
