-- BioGate MFA schema v3 (SQLite): WebAuthn credentials of bound devices. A device bound with a raw
-- public key is kind 'key'; a passkey is kind 'webauthn' with its credential id, its COSE public
-- key (public_key keeps the same key as DER SubjectPublicKeyInfo) and the authenticator's
-- signature counter. Keep in step with postgres/0003_device_credentials.sql.

ALTER TABLE devices ADD COLUMN kind TEXT NOT NULL DEFAULT 'key' CHECK (kind IN ('key', 'webauthn'));
ALTER TABLE devices ADD COLUMN credential_id TEXT;
ALTER TABLE devices ADD COLUMN credential_public_key BLOB;
ALTER TABLE devices ADD COLUMN sign_count INTEGER NOT NULL DEFAULT 0 CHECK (sign_count >= 0);
CREATE UNIQUE INDEX devices_credential ON devices (tenant_id, credential_id) WHERE credential_id IS NOT NULL;
