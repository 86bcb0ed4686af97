"""``biogate audit ...``: verify, export-public-key, export-checkpoints, anchor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.audit.anchor import Anchored, DirectoryStore, anchor, anchored
from services.common.audit.log import previous_audit_keys
from services.common.audit.signing import load_public_key, public_key_pem
from services.common.audit.verify import verify
from services.common.crypto.backend import open_audit_signer
from services.common.crypto.errors import NoKeyError
from services.common.crypto.signing import PublicKey

if TYPE_CHECKING:
    from services.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser("audit", help="the tamper-evident audit trail")
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify", help="check the hash chain, checkpoints and signed head")
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
    p.set_defaults(func=cmd_verify)

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
    every = getattr(args, "checkpoint_every", None)
    every = settings.audit.checkpoint_every if every is None else every
    known = _read_checkpoints(args.checkpoints) if getattr(args, "checkpoints", None) else []
    storage = _storage(settings)
    try:
        anchors = anchored(DirectoryStore(args.anchors), public_key, storage.audit) if getattr(
            args, "anchors", None) else Anchored()
        report = verify(storage.audit, public_key, known_checkpoints=known + anchors.checkpoints,
                        checkpoint_every=every or None, data_rows=storage.audited_rows())
    finally:
        storage.close()
    for problem in anchors.problems:  # the anchor store's, not the trail's: never taken as a rollback
        report.add(problem)
    print(report.render())
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
