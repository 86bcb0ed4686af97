"""``biogate keys ...``: init, list, rotate, retire. Handlers take (settings, args), return an exit code."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

from services.common.crypto.errors import KeyInUseError, KeyringError, UnknownKeyError
from services.common.crypto.keyring import LocalKeyring, open_keyring
from services.common.crypto.rotation import key_usage, retire, rotate

if TYPE_CHECKING:
    from services.settings import Settings
    from services.common.storage.interfaces import Storage


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="template-protection keys (key-encryption keys)")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create the keyring (and its first key) if there is none")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("list", help="key ids, ciphers, the primary, and how many records use each")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rotate", help="add a new primary key and re-wrap every record under it")
    p.add_argument("--cipher", choices=["AES-256-GCM", "SM4-GCM"], help="default: keys.cipher")
    p.add_argument("--batch", type=int, help="records per batch (default: keys.rewrap_batch)")
    p.set_defaults(func=cmd_rotate)

    p = sub.add_parser("retire", help="remove an old key; refused while any record still uses it")
    p.add_argument("key_id")
    p.set_defaults(func=cmd_retire)


def _storage(settings: Settings) -> Storage:
    from services.common.storage import open_storage

    return open_storage(settings.storage_dsn, settings.storage)


def _audit(settings: Settings, storage: Storage, keyring, event: str):
    """A function writing the command's audit record (opened before the operation starts, so the
    operation can call it inside its lock and transaction)."""
    from services.common.audit import AuditLog

    log = AuditLog.from_settings(settings, storage, keyring)
    actor = f"cli:{getpass.getuser()}"
    return lambda details: log.append(event, actor=actor, tenant_id=None, details=details)


def cmd_init(settings: Settings, args: argparse.Namespace) -> int:
    existed = settings.keyring_file.exists()
    keyring = open_keyring(settings)
    primary = keyring.key_info(keyring.primary_key_id())
    where = str(settings.keyring_file) if isinstance(keyring, LocalKeyring) else type(keyring).__name__
    state = "exists" if existed or not isinstance(keyring, LocalKeyring) else "created"
    print(f"keyring {where} {state}; primary key {primary.key_id} ({primary.cipher})")
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    keyring = open_keyring(settings, create=False)
    storage = _storage(settings)
    try:
        usage = key_usage(storage)
    finally:
        storage.close()
    print(f"{'KEY ID':<28} {'CIPHER':<12} {'CREATED':<21} {'PRIMARY':<8} RECORDS")
    for info in keyring.keys():
        print(
            f"{info.key_id:<28} {info.cipher:<12} {info.created:<21} "
            f"{'yes' if info.primary else '':<8} {usage.pop(info.key_id, 0)}"
        )
    for key_id, n in sorted(usage.items()):  # records under keys the keyring has lost
        print(f"{key_id:<28} {'MISSING':<12} {'':<21} {'':<8} {n}")
    return 1 if usage else 0


def cmd_rotate(settings: Settings, args: argparse.Namespace) -> int:
    keyring = open_keyring(settings, create=False)
    storage = _storage(settings)
    try:
        audit = _audit(settings, storage, keyring, "keys.rotate")
        report = rotate(
            storage,
            keyring,
            cipher=getattr(args, "cipher", None) or settings.keys.cipher,
            batch=getattr(args, "batch", None) or settings.keys.rewrap_batch,
            audit=lambda r: audit({
                "new_key_id": r.target_key_id,
                "templates_rewrapped": r.templates_rewrapped,
                "phones_rewrapped": r.phones_rewrapped,
                "failures": len(r.failures),
            }),
        )  # fmt: skip
    except KeyringError as exc:  # another key operation in progress, a cipher the backend lacks
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.close()
    print(
        f"new primary key {report.target_key_id}; re-wrapped {report.templates_rewrapped} templates "
        f"and {report.phones_rewrapped} phone numbers ({report.conflicts} concurrent updates revisited)"
    )
    for name, error in report.failures.items():
        print(f"FAILED {name}: {error}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_retire(settings: Settings, args: argparse.Namespace) -> int:
    keyring = open_keyring(settings, create=False)
    storage = _storage(settings)
    try:
        audit = _audit(settings, storage, keyring, "keys.retire")
        info = retire(storage, keyring, args.key_id, audit=lambda i: audit({"key_id": i.key_id}))
    except (KeyInUseError, UnknownKeyError, KeyringError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.close()
    print(f"retired key {info.key_id}")
    return 0
