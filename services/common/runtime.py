"""What every service process holds: storage, keys, template crypto, audit log and model store."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.audit import AuditLog
from services.common.config import CommonSettings
from services.common.crypto import EnvelopeCrypto, Keyring, open_keyring
from services.common.files import private_dir
from services.common.models import ModelStore
from services.common.privacy import Pseudonymizer
from services.common.server.auth import ensure_dev_credentials
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

    @classmethod
    def open(cls, settings: CommonSettings) -> "Runtime":
        private_dir(settings.data_dir)
        if settings.auth.dev_credentials and not settings.auth.principals:
            ensure_dev_credentials(settings)
        storage = open_storage(settings.storage_dsn, settings.storage)
        keyring = open_keyring(settings)
        return cls(
            settings=settings,
            storage=storage,
            keyring=keyring,
            crypto=EnvelopeCrypto(keyring),
            audit=AuditLog.from_settings(settings, storage, keyring),
            pseudonymize=Pseudonymizer(keyring.pseudonym_key()),
            models=ModelStore(settings),
        )

    def close(self) -> None:
        self.storage.close()
