"""``biogate purge``: deletes what the services keep past its retention (the ``retention`` section,
mfa.reviews.webhook.keep_s, voice.replay_retention_s; README "Data retention") in bounded batches,
and writes one audit record of the rows deleted per kind. A Kubernetes CronJob runs it every 15
minutes (deploy/k8s/base/retention-cronjob.yaml); elsewhere cron or a systemd timer does."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from services.common.storage.retention import Expiry, PurgeFailed, purge

if TYPE_CHECKING:
    from services.common.storage import SqlStorage
    from services.settings import Settings

LOCK = "biogate-retention"
EVENT = "retention.purged"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "purge", help="delete what is kept past its retention, in batches, with one audit record (run it on a "
                      "schedule)")
    p.add_argument("--batch", type=int, help="rows deleted per transaction (default: retention.batch)")
    p.set_defaults(func=cmd_purge)


def expiries(settings: Settings, storage: SqlStorage, now: datetime) -> list[Expiry]:
    """Every part's rows past their retention: the shared tables', the MFA's and the voice service's."""
    from services.mfa.storage import attach as attach_mfa
    from services.voice.storage import attach as attach_voice

    r = settings.retention
    return [*storage.expiries(r, now),
            *attach_mfa(storage).expiries(r, settings.mfa.reviews.webhook.keep_s, now),
            *attach_voice(storage).expiries(settings.voice.replay_retention_s, now.timestamp())]


def run(settings: Settings, storage: SqlStorage, actor: str, now: datetime, batch: int | None = None,
        on_batch: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """One purge, never two at once on a database (LockHeldError), then its audit record: the
    counts per kind, no subject; a purge that failed part way records what it deleted before."""
    from services.common.audit import AuditLog

    batch = batch or settings.retention.batch
    audit = AuditLog.for_operations(settings, storage)
    with storage.exclusive(LOCK, "biogate purge"):
        try:
            deleted = purge(storage.db, expiries(settings, storage, now), batch, on_batch)
        except PurgeFailed as exc:
            audit.append(EVENT, actor, None, details={"deleted": exc.deleted, "batch": batch, "complete": False})
            raise
        audit.append(EVENT, actor, None, details={"deleted": deleted, "batch": batch, "complete": True})
    return deleted


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    from services.commands.keys import cli_actor
    from services.common.storage import LockHeldError, open_storage
    from services.common.storage.db import utcnow

    if args.batch is not None and args.batch < 1:
        print("biogate purge: --batch must be at least 1", file=sys.stderr)
        return 2
    storage = open_storage(settings.storage_dsn, settings.storage)
    try:
        deleted = run(settings, storage, cli_actor(), utcnow(), args.batch)
    except LockHeldError as exc:
        print(f"refused: another `biogate purge` runs ({exc.holder}); nothing was deleted", file=sys.stderr)
        return 1
    finally:
        storage.close()
    print(f"biogate purge: {sum(deleted.values())} row(s) deleted"
          + "".join(f"\n  {kind}: {n}" for kind, n in deleted.items()))
    return 0
