"""``biogate keys ...``: init, list, rotate, rewrap, retire. Handlers take (settings, args), return an
exit code. Every command that creates, moves to or removes a key writes audit records (actor
``cli:<user>``, the backend, key ids, ciphers and counts; never key material)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.crypto.errors import KeyInUseError, KeyringError, UnknownKeyError
from services.common.crypto.keyring import Keyring, keyring_backend, open_keyring
from services.common.crypto.provision import KeyAudit, ensure_keys, operations_audit
from services.common.crypto.rotation import RewrapReport, SealedTable, key_usage, retire, rewrap_all, rotate

if TYPE_CHECKING:
    from services.common.config import CommonSettings
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

    p = sub.add_parser("rewrap", help="move records still under older keys to the primary (no new key)")
    p.add_argument("--batch", type=int, help="records per batch (default: keys.rewrap_batch)")
    p.set_defaults(func=cmd_rewrap)

    p = sub.add_parser("retire", help="remove an old key; refused while any record still uses it")
    p.add_argument("key_id")
    p.set_defaults(func=cmd_retire)


def _storage(settings: Settings) -> Storage:
    from services.common.storage import open_storage

    return open_storage(settings.storage_dsn, settings.storage)


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"


def key_audit(settings: CommonSettings, storage: Storage) -> KeyAudit:
    """A function writing one key-operation audit record as the CLI's user (opened before the
    operation starts, so the operation can call it inside its lock and transaction)."""
    return operations_audit(settings, storage, cli_actor())


def cmd_init(settings: Settings, args: argparse.Namespace) -> int:
    storage = _storage(settings)
    try:
        keyring, created = ensure_keys(settings, storage, cli_actor())
    except KeyringError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.close()
    primary = keyring.key_info(keyring.primary_key_id())
    backend = keyring_backend(settings)
    where = str(settings.keyring_file) if backend == "file" else f"({backend} backend)"
    print(f"keyring {where} {'created' if created else 'exists'}; primary key {primary.key_id} ({primary.cipher})")
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    keyring = open_keyring(settings, create=False)
    storage = _storage(settings)
    try:
        usage = key_usage(storage)
        for kept in _kept_elsewhere(settings, storage):  # what retire also waits for
            for counts, _ in kept().values():
                usage.update(counts)
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
    cipher = getattr(args, "cipher", None) or settings.keys.cipher
    return _move_records(settings, args, "new primary key {key}; re-wrapped {counts}",
                         lambda storage, keyring, batch, audit, tables: rotate(storage, keyring, cipher, batch, audit,
                                                                               tables))


def cmd_rewrap(settings: Settings, args: argparse.Namespace) -> int:
    return _move_records(settings, args, "re-wrapped {counts} to the primary key {key}",
                         lambda storage, keyring, batch, audit, tables: rewrap_all(storage, keyring, None, batch,
                                                                                   audit, tables))


def _move_records(
    settings: Settings,
    args: argparse.Namespace,
    summary: str,
    operation: Callable[[Storage, Keyring, int, KeyAudit, list[SealedTable]], RewrapReport],
) -> int:
    """Run a rotation or re-wrap, audited, and report it; ``summary`` names {key} and {counts}."""
    keyring = open_keyring(settings, create=False)
    storage = _storage(settings)
    try:
        batch = getattr(args, "batch", None) or settings.keys.rewrap_batch
        report = operation(storage, keyring, batch, key_audit(settings, storage), _sealed_tables(settings, storage))
    except KeyringError as exc:  # another key operation in progress, a cipher the backend lacks
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.close()
    counts = [f"{report.templates_rewrapped} templates", f"{report.phones_rewrapped} phone numbers"]
    counts += [f"{n} {what}(s)" for what, n in report.others_rewrapped.items() if n]
    print(summary.format(key=report.target_key_id, counts=", ".join(counts[:-1]) + " and " + counts[-1])
          + f" ({report.conflicts} concurrent updates revisited)")
    for name, error in report.failures.items():
        print(f"FAILED {name}: {error}", file=sys.stderr)
    return 0 if report.ok else 1


@dataclass(frozen=True)
class _Sealed:
    """Sealed data a service keeps in a store of its own: re-wrapped by rotation, counted by retire."""

    table: SealedTable
    usage: Callable[[], Counter[str]]  # records per key id
    kept: str  # how long each is kept (retire's refusal says it)
    in_database: bool = True  # False: counted by retire before its transaction (rotation.retire)


def _sealed(settings: Settings, storage: Storage) -> list[_Sealed]:
    """What the services seal outside templates and phone numbers (each part attached, and so
    migrated, here: not inside retire's transaction)."""
    from services.mfa.push.sealed import SealedConfirmations
    from services.mfa.storage import attach as attach_mfa
    from services.voice.replay import DatabaseReplayStore, RedisReplayStore, ReplayStoreError, open_store

    out = []
    voice = settings.voice
    try:
        replay = open_store(voice.replay_store, voice.replay_retention_s, voice.replay_max_per_subject,
                            voice.replay_key_prefix, storage=storage)
    except ReplayStoreError as exc:  # an unreachable Redis: its fingerprints can be neither moved nor counted
        raise KeyringError(f"{exc}; nothing was changed") from None
    # A process's memory store is out of any command's reach (README, Key rotation).
    if isinstance(replay, (DatabaseReplayStore, RedisReplayStore)):
        out.append(_Sealed(replay.sealed_table(), replay.key_usage,
                           f"voice.replay_retention_s ({voice.replay_retention_s} s) after each accepted capture",
                           in_database=isinstance(replay, DatabaseReplayStore)))
    push = SealedConfirmations(attach_mfa(storage))
    out.append(_Sealed(push.sealed_table(), push.key_usage,
                       f"in their mfa sessions until answered, or until `biogate purge` deletes the session "
                       f"(retention.sessions_s, {settings.retention.sessions_s} s after it expires, or while a "
                       f"review holds it)"))
    return out


def _sealed_tables(settings: Settings, storage: Storage) -> list[SealedTable]:
    """What the services seal in stores of their own, for rotation to re-wrap."""
    return [s.table for s in _sealed(settings, storage)]


Kept = Callable[[], dict[str, tuple[Counter[str], str]]]


def _kept_elsewhere(settings: Settings, storage: Storage) -> tuple[Kept, Kept]:
    """Counts of the sealed data the services keep outside templates and phones, per key id: (those in
    the database, those outside it)."""
    sealed = _sealed(settings, storage)

    def counts(in_database: bool) -> Kept:
        return lambda: {s.table.what: (s.usage(), s.kept) for s in sealed if s.in_database == in_database}

    return counts(True), counts(False)


def cmd_retire(settings: Settings, args: argparse.Namespace) -> int:
    keyring = open_keyring(settings, create=False)
    storage = _storage(settings)
    try:
        audit = key_audit(settings, storage)
        in_database, outside = _kept_elsewhere(settings, storage)
        info = retire(storage, keyring, args.key_id, audit=lambda i: audit("keys.retire", {"key_id": i.key_id}),
                      kept_elsewhere=in_database, kept_outside=outside)
    except (KeyInUseError, UnknownKeyError, KeyringError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.close()
    print(f"retired key {info.key_id}")
    return 0
