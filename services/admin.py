"""`biogate admin`: operator chores that need no running service."""

from __future__ import annotations

import argparse
import json
import secrets

from services.settings import Settings
from services.common.server.auth import ROLES, ensure_dev_credentials, token_sha256


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("admin", help="operator chores: tokens, development credentials")
    admin = p.add_subparsers(dest="admin_command", required=True, metavar="ACTION")

    token = admin.add_parser("new-token", help="make a bearer token and print its principal entry")
    token.add_argument("name")
    token.add_argument("--role", dest="roles", action="append", choices=ROLES, required=True)
    token.add_argument("--tenant", dest="tenants", action="append", default=None)
    token.set_defaults(func=new_token)

    dev = admin.add_parser("dev-token", help="print a development token (embedded-defaults mode)")
    dev.add_argument("role", choices=[*ROLES, "all"])
    dev.set_defaults(func=dev_token)


def new_token(settings: Settings, args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    entry = {"name": args.name, "roles": args.roles, "tenants": args.tenants or ["*"], "token_sha256": token_sha256(token)}
    print(f"token (give it to the caller; it is not stored): {token}")
    print("principal entry for auth.principals:")
    print(json.dumps(entry, indent=2))
    return 0


def dev_token(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.auth.dev_credentials or settings.auth.principals:
        print("development credentials are off in this configuration")
        return 1
    print(ensure_dev_credentials(settings)[f"dev-{args.role}"])
    return 0
