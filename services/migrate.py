"""`biogate migrate`: what a deployment prepares once, before its services start (the Kubernetes
migration Job, `make run` through `serve`): the storage schema, and the keys of the configured
backend, so that replicas starting together never race to create either."""

from __future__ import annotations

import argparse

from services.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="apply pending schema migrations and create missing keys, then exit")
    p.add_argument("--lock-wait-s", type=float, default=0.0, metavar="S",
                   help="give up after waiting S seconds for the migration lock another process holds "
                        "(default 0: wait without limit; services wait storage.migration_lock_wait_s)")
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from services.commands.keys import cli_actor
    from services.common.crypto.backend import open_audit_signer
    from services.common.crypto.provision import ensure_keys, operations_audit
    from services.common.storage import open_storage
    from services.mfa import storage as mfa_storage
    from services.mfa.tokens import SigningKeys
    from services.voice import storage as voice_storage

    if args.lock_wait_s < 0:
        raise ValueError(f"--lock-wait-s must be 0 (without limit) or more, not {args.lock_wait_s:g}")
    config = settings.storage.model_copy(update={"migration_lock_wait_s": args.lock_wait_s})
    storage = open_storage(settings.storage_dsn, config)  # applies what is pending, under a lock
    try:
        for part in (mfa_storage, voice_storage):  # each service's own tables
            part.attach(storage)
        with storage.db.read() as s:
            rows = s.all("SELECT part, max(version) FROM schema_versions GROUP BY part ORDER BY part")
        keyring, _ = ensure_keys(settings, storage, cli_actor())  # each key made is audited
        SigningKeys.from_settings(settings, audit=operations_audit(settings, storage, cli_actor()))
    finally:
        storage.close()
    version = ", ".join(f"{part} v{v}" for part, v in rows)
    signer = open_audit_signer(settings, create=False)
    print(f"biogate migrate: {storage.dialect} schema {version}; keys ({settings.keys.backend} backend): "
          f"primary KEK {keyring.primary_key_id()}, audit key {signer.key_id}")
    return 0
