"""The audit trail: append-only, personal-data-free, SHA-256 hash-chained, Ed25519-signed.

    log = AuditLog.from_settings(settings, storage, keyring)
    log.append("face.verify", actor="teller-app", tenant_id="bank-a", subject_id="cust-42",
               details={"decision": "accept", "score": 0.71, "model": "arcface-r100"})
    report = verify(storage.audit, AuditSigner.load(settings.audit_signing_key_file).public_key)
"""

from .chain import GENESIS_HASH
from .guard import AuditDataError, check_details
from .log import AuditIntegrityError, AuditKeyDestroyedError, AuditLog
from .signing import AuditSigner, load_public_key
from .verify import VerifyReport, verify

__all__ = [
    "GENESIS_HASH",
    "AuditDataError",
    "AuditIntegrityError",
    "AuditKeyDestroyedError",
    "AuditLog",
    "AuditSigner",
    "VerifyReport",
    "check_details",
    "load_public_key",
    "verify",
]
