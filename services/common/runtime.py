"""What every service process holds: storage, keys, template crypto, audit log and model store."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.audit import AuditLog
from services.common.config import CommonSettings
from services.common.crypto import EnvelopeCrypto, Keyring
from services.common.crypto.provision import KeyAudit, ensure_keys, key_audit
from services.common.files import private_dir
from services.common.models import ModelStore
from services.common.privacy import Pseudonymizer
from services.common.server.auth import ensure_dev_credentials
from services.common.server.bootstrap import ReadinessCheck
from services.common.storage import Storage, open_storage


@dataclass
class Runtime:
    settings: CommonSettings
    storage: Storage
    keyring: Keyring
    crypto: EnvelopeCrypto
    audit: AuditLog
    pseudonymize: Pseudonymizer
    models: ModelStore
    actor: str  # "service:<name>": who the audit trail says made a key this process made

    @classmethod
    def open(cls, settings: CommonSettings, name: str = "biogate") -> "Runtime":
        """``name``: the service (face, voice, mfa), named as the actor of the keys a first start makes."""
        private_dir(settings.data_dir)
        if settings.auth.dev_credentials and not settings.auth.principals:
            ensure_dev_credentials(settings)
        storage = open_storage(settings.storage_dsn, settings.storage)
        actor = f"service:{name}"
        try:
            keyring, _ = ensure_keys(settings, storage, actor)  # a first start makes the keys, audited
        except BaseException:
            storage.close()
            raise
        return cls(
            settings=settings,
            storage=storage,
            keyring=keyring,
            crypto=EnvelopeCrypto(keyring),
            audit=AuditLog.from_settings(settings, storage, keyring),
            pseudonymize=Pseudonymizer(keyring.pseudonym_key()),
            models=ModelStore(settings),
            actor=actor,
        )

    def key_audit(self) -> KeyAudit:
        """Writes the records of a key this process makes while it runs (the MFA's token keys)."""
        return key_audit(self.audit, self.settings, self.actor)

    def readiness(self) -> list[ReadinessCheck]:
        """What the server checks besides the calls: the audit key this process signs with is not
        destroyed (one at its start may be, later: `biogate audit destroy-key` after switch-key)."""
        return [ReadinessCheck("the audit signing key", self.settings.audit.key_check_s, self.audit.check_key)]

    def close(self) -> None:
        self.storage.close()
