"""`biogate models fetch|verify|list|path`: the model cache from the command line."""

from __future__ import annotations

import argparse
import sys
import time

from services.settings import Settings
from services.common.models.errors import ModelError
from services.common.models.store import ModelStore


def _fetch(settings: Settings, args: argparse.Namespace) -> int:
    store = ModelStore(settings)
    started = time.monotonic()
    try:
        results = store.fetch(args.ids or None, force=args.force)
    except ModelError as err:
        print(f"models fetch: failed\n{err}", file=sys.stderr)
        return 1
    fetched = [r for r in results if r.action == "fetched"]
    for r in fetched:
        print(f"fetched {r.model_id}/{r.file} from {r.source}")
    print(
        f"models: {len(fetched)} file(s) fetched, {len(results) - len(fetched)} already cached "
        f"in {store.cache_dir} ({time.monotonic() - started:.1f} s)"
    )
    return 0


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    store = ModelStore(settings)
    try:
        problems = store.verify(args.ids or None)
    except ModelError as err:
        print(f"models verify: {err}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"problem: {p}")
    if problems:
        return 1
    print(f"models: all files verified in {store.cache_dir}")
    return 0


def _list(settings: Settings, args: argparse.Namespace) -> int:
    store = ModelStore(settings)
    rows = [("ID", "ROLE", "VERSION", "ACTIVE", "LICENCE", "STATUS")]
    for m in store.manifest.models:
        licence = m.licence if m.commercial_use else f"{m.licence} [no commercial use]"
        rows.append((m.id, m.role, m.version, "yes" if m.active else "no", licence, store.status(m.id).state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return 0


def _path(settings: Settings, args: argparse.Namespace) -> int:
    try:
        print(ModelStore(settings).path(args.id, args.file))
    except ModelError as err:
        print(f"models path: {err}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="fetch, verify and list the pretrained model files")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    p = sub.add_parser("fetch", help="fetch models into the cache (default: the active ones)")
    p.add_argument("ids", nargs="*", metavar="ID", help="model ids (default: every active model)")
    p.add_argument("--force", action="store_true", help="fetch again even files that are cached and intact")
    p.set_defaults(func=_fetch)

    p = sub.add_parser("verify", help="hash the cached files; exit 1 on a problem")
    p.add_argument("ids", nargs="*", metavar="ID", help="model ids (default: active and cached ones)")
    p.set_defaults(func=_verify)

    p = sub.add_parser("list", help="the manifest's models and their cache status")
    p.set_defaults(func=_list)

    p = sub.add_parser("path", help="print the cached path of a model file")
    p.add_argument("id", metavar="ID")
    p.add_argument("file", nargs="?", help="file name (default: the model's main file)")
    p.set_defaults(func=_path)
