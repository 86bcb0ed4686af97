"""``biogate audit ...``: verify, templates, export-public-key, export-checkpoints, anchor, new-key, switch-key,
destroy-key."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.audit.anchor import Anchored, DirectoryStore, anchor, anchored, unanchored
from services.common.audit.chain import checkpoint_message
from services.common.audit.continuity import TrailKeys, trail_keys
from services.common.audit.log import previous_audit_keys
from services.common.audit.signing import key_map, load_public_key, public_key_pem
from services.common.audit.verify import VerifyReport, verify
from services.common.crypto.backend import open_audit_signer
from services.common.crypto.errors import NoKeyError
from services.common.crypto.signing import PublicKey, Signer, verify_signature

if TYPE_CHECKING:
    from services.common.storage.interfaces import Storage
    from services.settings import Settings

ATTEST_LOCK = "biogate-template-attestation"
KEY_LOCK = "biogate-audit-key"
KEY_ID = re.compile(r"(?:ed25519|p256):[0-9a-f]{16}")


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser("audit", help="the tamper-evident audit trail")
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify", help="check the hash chain, checkpoints and signed head")
    _verify_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "templates", help="verify the trail, then check every stored template is the one its latest audit record "
                          "names (rollback, substitution, deletion outside BioGate)")
    _verify_options(p)
    p.add_argument("--attest-legacy", action="store_true",
                   help="write an audit record naming each template enrolled before the trail named templates "
                        "(run once after the upgrade, on a database you trust)")
    p.add_argument("--batch", type=int, default=1000, help="templates and audit records per read (default 1000)")
    p.set_defaults(func=cmd_templates)

    p = sub.add_parser(
        "anchor", help="copy the signed checkpoints and head to a write-once directory (run it periodically)"
    )
    p.add_argument("--to", type=Path, required=True, help="the write-once directory (a WORM volume, another host)")
    p.add_argument("--public-key", type=Path, help="PEM public key (default: from the signing key)")
    _full_option(p)
    p.set_defaults(func=cmd_anchor)

    p = sub.add_parser(
        "new-key", help="make the next audit signing key and introduce it in the trail, signed by the current key "
                        "(every service trusts it from then on); then `audit switch-key`")
    p.set_defaults(func=cmd_new_key)

    p = sub.add_parser(
        "switch-key", help="make the next audit key (introduced by `audit new-key`) the one processes sign with from "
                           "their next start; restart the services, one by one, afterwards")
    p.set_defaults(func=cmd_switch_key)

    p = sub.add_parser(
        "destroy-key", help="destroy the private key of a retired audit signing key once every service signs with "
                            "its successor (verify keeps its public key from the trail); audited")
    p.add_argument("key_id", help="the retired key's id (ed25519:...), as the successor's audit.key_introduced "
                                  "names it under by.key_id")
    _verify_options(p)
    p.set_defaults(func=cmd_destroy_key)

    p = sub.add_parser("export-public-key", help="the PEM public key that verifies the trail")
    p.add_argument("--out", type=Path, help="write here instead of standard output")
    p.set_defaults(func=cmd_export_public_key)

    p = sub.add_parser(
        "export-checkpoints", help="'SEQ HASH TS KEY_ID SIGNATURE' lines of the signed checkpoints, for WORM storage"
    )
    p.set_defaults(func=cmd_export_checkpoints)


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--public-key", type=Path, help="PEM public key (default: from the signing key)")
    p.add_argument(
        "--checkpoints", type=Path,
        help="file of signed checkpoint lines kept outside the database (from export-checkpoints); a line whose "
             "signature does not verify is a finding, never a checkpoint",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int,
        help="require a checkpoint at every multiple (default: audit.checkpoint_every; 0: off)",
    )  # fmt: skip
    p.add_argument("--anchors", type=Path, help="directory of write-once anchors written by `audit anchor`")
    _full_option(p)


def _full_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full-anchor-check", action="store_true",
                   help="check the signature of every anchor, also of those the trail agrees with (by default "
                        "those are sampled: they can neither show nor hide a rollback)")


def _verify_kwargs(settings: Settings, args: argparse.Namespace, public_key: list[PublicKey],
                   storage: Storage) -> tuple[dict[str, Any], list[str]]:
    """The checkpoints kept outside the database and the checkpoint interval the options name, and the
    problems of what was kept (an anchor or a checkpoint line the audit key did not sign: reported,
    never taken as a checkpoint or a rollback). Signed by a configured key or one the trail introduces."""
    every = getattr(args, "checkpoint_every", None)
    every = settings.audit.checkpoint_every if every is None else every
    keys = _trusted(storage, public_key)
    kept = _read_checkpoints(args.checkpoints, keys) if getattr(args, "checkpoints", None) else Anchored()
    anchors = Anchored()
    if getattr(args, "anchors", None):
        anchors = anchored(DirectoryStore(args.anchors), keys, storage.audit,
                           full=getattr(args, "full_anchor_check", False))
        anchors.problems.extend(_unanchored(settings, args.anchors, storage, anchors))
    return ({"known_checkpoints": kept.checkpoints + anchors.checkpoints, "checkpoint_every": every or None},
            kept.problems + anchors.problems)


def _unanchored(settings: Settings, path: Path, storage: Storage, found: Anchored) -> list[str]:
    """The finding when a checkpoint older than audit.anchor_max_age_s is not anchored in ``path``."""
    max_age = settings.audit.anchor_max_age_s
    cp = unanchored(storage.audit, found, max_age, datetime.now(timezone.utc))
    if cp is None:
        return []
    newest = max((seq for seq, _ in found.checkpoints), default=0)
    where = f"the newest anchor is at seq {newest}" if newest else "the directory holds no anchor of this trail"
    return [f"{path}: no anchor reaches the checkpoint at seq {cp.seq} of {cp.ts.isoformat()}, older than "
            f"audit.anchor_max_age_s ({max_age} s); {where}: `biogate audit anchor --to` does not write here (the "
            "wrong or an empty volume mounted, or the anchor CronJob failing or stopped), and a rollback or "
            "truncation since the newest anchor would go unseen"]


def _no_anchors_directory(args: argparse.Namespace) -> bool:
    """Whether ``--anchors`` names no directory (said on stderr): checking against it would check nothing."""
    path = getattr(args, "anchors", None)
    if path is None or path.is_dir():
        return False
    why = "not a directory" if path.exists() else "no such directory"
    print(f"--anchors {path}: {why}; pass the directory `biogate audit anchor --to` writes (in Kubernetes the "
          "claim biogate-audit-anchors, mounted there); nothing was checked", file=sys.stderr)
    return True


def _trusted(storage: Storage, configured: list[PublicKey]) -> list[PublicKey]:
    """The configured audit keys and those the trail introduces."""
    return list(trail_keys(storage.audit, configured).keys.values())


def _storage(settings: Settings):
    from services.common.storage import open_storage

    return open_storage(settings.storage_dsn, settings.storage)


def _read_checkpoints(path: Path, keys: list[PublicKey]) -> Anchored:
    """The lines of ``path`` (``export-checkpoints``: seq, hash, time, key id, signature) whose
    signature verifies; each other line is a problem of its own. A line without a signature is one
    too: `export-checkpoints` has always written it, and a bare 'SEQ HASH' is only as good as the place
    it was kept, which verify cannot tell (an edited line would otherwise report truncation or a
    rollback that never happened, or hide one)."""
    by_id = key_map(keys)
    out = Anchored()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        where = f"{path.name} line {n}"
        parts = line.split()
        if len(parts) != 5:
            out.problems.append(f"{where}: not 'SEQ HASH TS KEY_ID SIGNATURE' as `audit export-checkpoints` writes "
                                "it (unsigned); not used as a checkpoint")
            continue
        try:
            seq, hash_, ts = int(parts[0]), parts[1], datetime.fromisoformat(parts[2])
            message, signature = checkpoint_message(seq, hash_, ts), bytes.fromhex(parts[4])
        except ValueError as exc:
            out.problems.append(f"{where}: unreadable ({type(exc).__name__}); not used as a checkpoint")
            continue
        key = by_id.get(parts[3])
        if key is None or not verify_signature(key, signature, message):
            why = f"signed with unknown key {parts[3]!r}" if key is None else "bad signature"
            out.problems.append(f"{where}: {why}; not the audit key's checkpoint (forged or corrupted), not used as "
                                "a checkpoint")
            continue
        out.checkpoints.append((seq, hash_))
    return out


def _public_key(settings: Settings, args: argparse.Namespace) -> list[PublicKey] | None:
    """The audit key (``--public-key``, or the configured one) and ``audit.previous_public_keys``."""
    key_file = getattr(args, "public_key", None)
    if key_file is not None:
        key = load_public_key(Path(key_file).read_bytes())
    elif settings.keys.backend == "pkcs11" or settings.audit_signing_key_file.exists():
        key = open_audit_signer(settings, create=False).public_key
    else:
        print(f"no public key: pass --public-key or provide {settings.audit_signing_key_file}", file=sys.stderr)
        return None
    return [key, *previous_audit_keys(settings)]


def _verified(settings: Settings, args: argparse.Namespace, public_key: list[PublicKey],
              storage: Storage) -> VerifyReport:
    """The trail checked as `audit verify` checks it, with the options it was given."""
    options, anchor_problems = _verify_kwargs(settings, args, public_key, storage)
    report = verify(storage.audit, public_key, data_rows=storage.audited_rows(), **options)
    for problem in anchor_problems:
        report.add(problem)
    return report


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    if _no_anchors_directory(args):
        return 2
    public_key = _public_key(settings, args)
    if public_key is None:
        return 2
    storage = _storage(settings)
    try:
        report = _verified(settings, args, public_key, storage)
    finally:
        storage.close()
    print(report.render())
    return 0 if report.ok else 1


def cmd_templates(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 1 on any finding or a trail that does not verify; unattested templates alone are no failure."""
    from services.commands.keys import cli_actor
    from services.common.audit.log import AuditLog
    from services.common.audit.templates import attester, check_templates
    from services.common.crypto.keyring import open_keyring
    from services.common.privacy import Pseudonymizer
    from services.common.storage.errors import LockHeldError

    if _no_anchors_directory(args):
        return 2
    public_key = _public_key(settings, args)
    if public_key is None:
        return 2
    keyring = open_keyring(settings, create=False)  # the pseudonym key: the trail names subjects by pseudonym
    storage = _storage(settings)
    try:
        options, anchor_problems = _verify_kwargs(settings, args, public_key, storage)
        with contextlib.ExitStack() as stack:
            attest = None
            if args.attest_legacy:
                stack.enter_context(storage.exclusive(ATTEST_LOCK, "audit templates --attest-legacy"))
                attest = attester(storage, AuditLog.from_settings(settings, storage, keyring), cli_actor())
            report = check_templates(storage, public_key, Pseudonymizer(keyring.pseudonym_key()),
                                     batch=max(1, args.batch), attest=attest, **options)
    except LockHeldError as exc:
        print(f"refused: another `audit templates --attest-legacy` runs ({exc.holder}); nothing was written",
              file=sys.stderr)
        return 1
    finally:
        storage.close()
    for problem in anchor_problems:
        report.chain.add(problem)
    print(report.render())
    if args.attest_legacy and not report.chain.ok:
        print("nothing attested: the trail did not verify", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_export_public_key(settings: Settings, args: argparse.Namespace) -> int:
    try:  # never made here: a key's creation is audited (`biogate migrate` or the first start makes it)
        pem = public_key_pem(open_audit_signer(settings, create=False).public_key)
    except NoKeyError as exc:
        print(f"no audit signing key: {exc}", file=sys.stderr)
        return 2
    out = getattr(args, "out", None)
    if out:
        Path(out).write_bytes(pem)
    else:
        sys.stdout.write(pem.decode("ascii"))
    return 0


def cmd_export_checkpoints(settings: Settings, args: argparse.Namespace) -> int:
    storage = _storage(settings)
    try:
        for cp in storage.audit.iter_checkpoints():
            print(f"{cp.seq} {cp.hash} {cp.ts.isoformat()} {cp.key_id} {cp.signature.hex()}")
    finally:
        storage.close()
    return 0


def cmd_anchor(settings: Settings, args: argparse.Namespace) -> int:
    public_key = _public_key(settings, args)
    if public_key is None:
        return 2
    storage = _storage(settings)
    try:
        report = anchor(storage.audit, DirectoryStore(args.to), _trusted(storage, public_key),
                        full=args.full_anchor_check)
    finally:
        storage.close()
    print(f"anchored {len(report.written)} new object(s) in {args.to}" + "".join(f"\n  {n}" for n in report.written))
    for problem in report.problems:
        print(f"  {problem}")
    return 1 if report.problems else 0


def cmd_new_key(settings: Settings, args: argparse.Namespace) -> int:
    """Make the next audit key (audited like every key) and introduce it: one record, signed with a
    checkpoint by the current key, carrying the new key's proof. Run again after a failure, it
    introduces the next key it finds instead of making another."""
    from services.commands.keys import cli_actor
    from services.common.audit.continuity import INTRODUCED, introduction_details
    from services.common.audit.log import AuditLog
    from services.common.crypto.backend import create_audit_signer, open_next_audit_signer
    from services.common.crypto.provision import audited, key_audit

    def introduce(storage: Storage, current: Signer) -> int:
        log = AuditLog.for_operations(settings, storage, current)
        try:
            nxt = open_next_audit_signer(settings)
        except NoKeyError:
            planned = {"key": "audit-signing", "algorithm": current.algorithm, "purpose": "rotate"}
            nxt = audited(key_audit(log, settings, cli_actor()), [planned], lambda: create_audit_signer(settings, next_key=True),
                          lambda made: [{**planned, "key_id": made.key_id, "algorithm": made.algorithm}])
        trail = trail_keys(storage.audit, [current.public_key, *previous_audit_keys(settings)])
        if nxt.key_id in trail.introduced_at:
            print(f"the next audit key {nxt.key_id} was introduced at seq {trail.introduced_at[nxt.key_id]}; "
                  "run `biogate audit switch-key`")
            return 0
        row = log.append(INTRODUCED, cli_actor(), None, details=introduction_details(nxt, current), checkpoint=True)
        print(f"introduced the next audit key {nxt.key_id} at seq {row.seq}, vouched for by {current.key_id}; every "
              "service now chains onto heads it signs. Next: `biogate audit switch-key`, then restart the services")
        return 0

    return _key_operation(settings, "audit new-key", introduce)


def cmd_switch_key(settings: Settings, args: argparse.Namespace) -> int:
    """Refused unless the trail introduces the next key: a head it signed would stop every service
    that does not trust it. A switch that stopped midway in the token (two keys labelled the audit
    key, none the next) is finished: the key the trail introduced by the other is the next one."""
    from services.commands.keys import cli_actor
    from services.common.audit.log import AuditLog
    from services.common.crypto.backend import open_next_audit_signer, switch_audit_signer
    from services.common.crypto.provision import audit_failure, key_audit

    def switch(storage: Storage, current: Signer) -> int:
        trail = trail_keys(storage.audit, [current.public_key, *previous_audit_keys(settings)])
        details: dict[str, Any] = {"key": "audit-signing"}
        try:
            nxt, replaced = open_next_audit_signer(settings), current.key_id
        except NoKeyError as exc:  # also what a second run finds after another operator's switch
            half = _half_switched(settings, trail)
            if isinstance(half, str):
                print(f"refused: {exc}; the audit key is {current.key_id}{half}; nothing was changed", file=sys.stderr)
                return 2
            nxt, replaced = half
            details["finishing"] = True
            print(f"finishing the switch to the audit key {nxt.key_id} that stopped midway (the token labels it and "
                  f"{replaced} as the audit key)")
        if nxt.key_id not in trail.introduced_at or nxt.key_id not in trail.keys:
            print(f"refused: the trail does not introduce the next audit key {nxt.key_id}; run `biogate audit "
                  "new-key` (it introduces the next key it finds); nothing was changed", file=sys.stderr)
            return 1
        audit = key_audit(AuditLog.for_operations(settings, storage, current), settings, cli_actor())
        details.update({"key_id": nxt.key_id, "replaces": {"key_id": replaced}})
        audit("keys.switching", details)
        try:
            switch_audit_signer(settings, nxt.key_id)
        except BaseException as exc:
            audit_failure(audit, "keys.switch_failed", details, exc)
            raise
        audit("keys.switched", details)
        print(f"the audit key is now {nxt.key_id} for every process that starts; restart the services one by one "
              f"(those still running sign with {replaced} until then, and every one trusts both)")
        return 0

    return _key_operation(settings, "audit switch-key", switch)


def _half_switched(settings: Settings, trail: TrailKeys) -> tuple[Signer, str] | str:
    """(the next key, the one it replaces) of a switch that stopped between its writes to the token,
    when the trail introduces one of the keys labelled the audit key by another; else what to add to
    the refusal."""
    from services.common.crypto.backend import audit_signers

    keys = {signer.key_id: signer for signer in audit_signers(settings)}
    if len(keys) < 2:
        return ""
    for link in reversed(trail.links):
        if link.key_id in keys and link.by_key_id in keys:
            return keys[link.key_id], link.by_key_id
    return (f" (the token labels {len(keys)} keys the audit key, {', '.join(sorted(keys))}, and the trail introduces "
            "none of them by another: `biogate audit verify` names the keys the trail trusts)")


def cmd_destroy_key(settings: Settings, args: argparse.Namespace) -> int:
    """Refused, with nothing written, unless the key is retired here, the trail verifies and a valid
    introduction in it shows the key vouched for its successor (so the trail holds its public key
    and every signature it made stays checkable). The ``audit.key_destroyed`` record commits first,
    with a checkpoint (anchored): a crash before the destruction leaves a record of a destruction
    that did not happen, and the key, which a run again destroys; never a destroyed key the trail
    does not name. A destruction that fails is recorded as ``audit.key_destroy_failed``."""
    from services.common.crypto.backend import open_next_audit_signer

    target = args.key_id
    if not KEY_ID.fullmatch(target):
        print(f"refused: {target!r} is not an audit key id (ed25519: or p256: and 16 hex digits, as `audit verify` "
              "and the audit.key_introduced records name keys); nothing was changed", file=sys.stderr)
        return 2
    if _no_anchors_directory(args):
        return 2

    def destroy(storage: Storage, current: Signer) -> int:
        nxt = None
        with contextlib.suppress(NoKeyError):
            nxt = open_next_audit_signer(settings)
        if target in (current.key_id, nxt.key_id if nxt else None):
            which = "the audit key every process signs with" if target == current.key_id else "the next audit key"
            print(f"refused: {target} is {which}; only a key `biogate audit switch-key` retired can be destroyed "
                  "(new-key, switch-key, restart the services, then destroy-key); nothing was changed", file=sys.stderr)
            return 1
        public_key = _public_key(settings, args)
        if public_key is None:
            return 2
        refusal = _destroy_refusal(settings, args, storage, public_key, current, target)
        if refusal:
            print(f"refused: {refusal}; nothing was changed", file=sys.stderr)
            return 1
        return _destroy_recorded(settings, storage, current, target)

    return _key_operation(settings, "audit destroy-key", destroy)


def _key_operation(settings: Settings, what: str, operation: Callable[[Storage, Signer], int]) -> int:
    """``operation(storage, the current audit key)`` holding KEY_LOCK, the key opened under the lock,
    as every key the operation opens: keys opened before it would be those from before another
    operator's new-key or switch-key that held the lock meanwhile (a switch of keys switched
    already, a key introduced by the retired one)."""
    storage = _storage(settings)

    def locked() -> int:
        try:
            current = open_audit_signer(settings, create=False)
        except NoKeyError as exc:
            print(f"no audit signing key: {exc}; nothing was changed", file=sys.stderr)
            return 2
        return operation(storage, current)

    try:
        return _under_key_lock(storage, what, locked)
    finally:
        storage.close()


def _under_key_lock(storage: Storage, what: str, operation: Callable[[], int]) -> int:
    """``operation()`` holding KEY_LOCK, so that new-key, switch-key and destroy-key never interleave
    (a switch retiring the key a destruction is checking, two new-keys each making a key); refused,
    before anything is read or written, while another holds it."""
    from services.common.storage.errors import LockHeldError

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(storage.exclusive(KEY_LOCK, what))
        except LockHeldError as exc:
            print(f"refused: another audit key operation runs ({exc.holder}); nothing was changed", file=sys.stderr)
            return 1
        return operation()
    raise AssertionError("unreachable")


def _destroy_recorded(settings: Settings, storage: Storage, current: Signer, target: str) -> int:
    """The record, then the destruction (cmd_destroy_key says why in this order)."""
    from services.commands.keys import cli_actor
    from services.common.audit.continuity import DESTROYED
    from services.common.audit.log import AuditLog
    from services.common.crypto.backend import AUDIT_KEY_DESTRUCTION, destroy_retired_audit_key
    from services.common.crypto.provision import audit_failure

    actor, log = cli_actor(), AuditLog.for_operations(settings, storage, current)

    def failed(event: str, details: dict[str, Any]) -> None:
        log.append(event, actor, None, details=details)

    details = {"key": "audit-signing", "key_id": target, "backend": settings.keys.backend,
               "how": AUDIT_KEY_DESTRUCTION[settings.keys.backend]}
    seq = log.append(DESTROYED, actor, None, details=details, checkpoint=True).seq
    try:
        destroy_retired_audit_key(settings, target)
    except Exception as exc:
        audit_failure(failed, "audit.key_destroy_failed", details, exc)
        print(f"failed: the trail records the destruction of {target} at seq {seq}, but it failed "
              f"({type(exc).__name__}: {exc}); fix that and run `biogate audit destroy-key {target}` again",
              file=sys.stderr)
        return 1
    print(f"destroyed the private key of the retired audit key {target} ({details['how']}), recorded at seq "
          f"{seq}; verify keeps checking its signatures with the public key the trail holds. Destroy its "
          "copies in backups too")
    return 0


def _destroy_refusal(settings: Settings, args: argparse.Namespace, storage: Storage, public_key: list[PublicKey],
                     current: Signer, target: str) -> str | None:
    """Why ``target`` must not be destroyed now, or None."""
    from services.common.audit.continuity import DESTROYED, INTRODUCED, destroyed_key
    from services.common.crypto.backend import has_retired_audit_key, retired_audit_key_file

    if not has_retired_audit_key(settings, target):
        earlier = [row.seq for row, _ in storage.audit.checkpointed(DESTROYED) if destroyed_key(row) == target]
        where = (f"no object labelled {settings.keys.pkcs11.label_prefix}-audit-retired with it in the token"
                 if settings.keys.backend == "pkcs11" else f"no {retired_audit_key_file(settings, target)}")
        why = (f"destroyed already ({DESTROYED} at seq {earlier[-1]})" if earlier else
               "check the id (`biogate audit verify` names the keys that signed; the retired one is `by.key_id` of "
               f"the {INTRODUCED} record of its successor)")
        return f"the private key of {target} is not here ({where}): {why}"
    trail = trail_keys(storage.audit, [current.public_key, *previous_audit_keys(settings)])
    if target not in trail.keys or not any(link.by_key_id == target and link.key_id in trail.keys
                                           for link in trail.links):
        return (f"the trail holds no valid {INTRODUCED} in which {target} vouches for its successor: without it the "
                "trail does not hold its public key, and what it signed could no longer be checked once it is gone; "
                "switch-key retires a key only once the trail introduces its successor, so `biogate audit verify` "
                "shows what happened to that introduction")
    report = _verified(settings, args, public_key, storage)
    if not report.ok:
        print(report.render())
        return ("the audit trail does not verify: its records may be evidence the key is needed for; run `biogate "
                "audit verify` and deal with its findings first")
    return None
