-- BioGate MFA schema v8 (PostgreSQL): the tenant's bound devices by fingerprint, whoever they are bound
-- to: a subject keeps at most its newest device failure counters (services/mfa/lockout.py), never
-- dropping a bound device's, and asks this index on each new counter.
-- Keep in step with sqlite/0008_bound_fingerprints.sql.

CREATE INDEX devices_bound_fingerprint ON devices (tenant_id, fingerprint) WHERE revoked_at IS NULL;
