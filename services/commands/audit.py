"""``biogate audit ...``: verify, templates, export-public-key, export-checkpoints, anchor."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.audit.anchor import Anchored, DirectoryStore, anchor, anchored
from services.common.audit.log import previous_audit_keys
from services.common.audit.signing import load_public_key, public_key_pem
from services.common.audit.verify import verify
from services.common.crypto.backend import open_audit_signer
from services.common.crypto.errors import NoKeyError
from services.common.crypto.signing import PublicKey

if TYPE_CHECKING:
    from services.common.storage.interfaces import Storage
    from services.settings import Settings

ATTEST_LOCK = "biogate-template-attestation"


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
    p.set_defaults(func=cmd_anchor)

    p = sub.add_parser("export-public-key", help="the PEM public key that verifies the trail")
    p.add_argument("--out", type=Path, help="write here instead of standard output")
    p.set_defaults(func=cmd_export_public_key)

    p = sub.add_parser(
        "export-checkpoints", help="'SEQ HASH' lines of the signed checkpoints, for WORM storage"
    )
    p.set_defaults(func=cmd_export_checkpoints)


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--public-key", type=Path, help="PEM public key (default: from the signing key)")
    p.add_argument(
        "--checkpoints", type=Path,
        help="file of 'SEQ HASH' lines kept outside the database (from export-checkpoints)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int,
        help="require a checkpoint at every multiple (default: audit.checkpoint_every; 0: off)",
    )  # fmt: skip
    p.add_argument("--anchors", type=Path, help="directory of write-once anchors written by `audit anchor`")


def _verify_kwargs(settings: Settings, args: argparse.Namespace, public_key: list[PublicKey],
                   storage: Storage) -> tuple[dict[str, Any], list[str]]:
    """The checkpoints kept outside the database and the checkpoint interval the options name, and the
    anchor store's own problems (an anchor the audit key did not sign: reported, never taken as a
    checkpoint or a rollback)."""
    every = getattr(args, "checkpoint_every", None)
    every = settings.audit.checkpoint_every if every is None else every
    known = _read_checkpoints(args.checkpoints) if getattr(args, "checkpoints", None) else []
    anchors = anchored(DirectoryStore(args.anchors), public_key, storage.audit) if getattr(
        args, "anchors", None) else Anchored()
    return {"known_checkpoints": known + anchors.checkpoints, "checkpoint_every": every or None}, anchors.problems


def _storage(settings: Settings):
    from services.common.storage import open_storage

    return open_storage(settings.storage_dsn, settings.storage)


def _read_checkpoints(path: Path) -> list[tuple[int, str]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            seq, hash_ = line.split()[:2]
            out.append((int(seq), hash_))
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


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    public_key = _public_key(settings, args)
    if public_key is None:
        return 2
    storage = _storage(settings)
    try:
        options, anchor_problems = _verify_kwargs(settings, args, public_key, storage)
        report = verify(storage.audit, public_key, data_rows=storage.audited_rows(), **options)
    finally:
        storage.close()
    for problem in anchor_problems:
        report.add(problem)
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
        for cp in storage.audit.checkpoints():
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
        report = anchor(storage.audit, DirectoryStore(args.to), public_key)
    finally:
        storage.close()
    print(f"anchored {len(report.written)} new object(s) in {args.to}" + "".join(f"\n  {n}" for n in report.written))
    for problem in report.problems:
        print(f"  {problem}")
    return 1 if report.problems else 0
