-- BioGate schema v3 (SQLite): the latest recording and withdrawal of a tenant's consents of one
-- purpose in two index seeks (what a face gallery polls before each 1:N search).
-- Keep in step with postgres/0003_consent_changes.sql.

CREATE INDEX consents_recorded ON consents (tenant_id, purpose, recorded_at);
CREATE INDEX consents_withdrawn ON consents (tenant_id, purpose, withdrawn_at);
