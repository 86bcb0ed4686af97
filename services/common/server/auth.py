"""Caller authentication: bearer tokens and mTLS client certificates mapped to principals."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

import grpc

from services.common.config import Settings
from services.common.context import Principal

ROLES = ("enroller", "verifier", "orchestrator", "admin", "auditor")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Resolves the caller of an RPC from its metadata or its TLS peer certificate."""

    def __init__(self, principals: list[tuple[Principal, str | None, str | None]]) -> None:
        # (principal, token sha256, certificate subject)
        self._by_token = {t: p for p, t, _ in principals if t}
        self._by_cert = {c: p for p, _, c in principals if c}

    @classmethod
    def from_settings(cls, settings: Settings) -> "Authenticator":
        entries = [
            (Principal(p.name, frozenset(p.roles), frozenset(p.tenants), p.terminal.channel if p.terminal else None),
             p.token_sha256, p.cert_subject)
            for p in settings.auth.principals
        ]
        if not entries and settings.auth.dev_credentials:
            for name, token in ensure_dev_credentials(settings).items():
                roles = ROLES if name == "dev-all" else (name.removeprefix("dev-"),)
                entries.append((Principal(name, frozenset(roles), frozenset({"*"})), token_sha256(token), None))
        if not entries:
            raise ValueError("no principals configured: set auth.principals or auth.dev_credentials")
        return cls(entries)

    def authenticate(self, context: grpc.ServicerContext) -> Principal | None:
        metadata = dict(context.invocation_metadata())
        auth = metadata.get("authorization", "")
        if auth.lower().startswith("bearer "):
            digest = token_sha256(auth[7:].strip())
            for known, principal in self._by_token.items():
                if hmac.compare_digest(known, digest):
                    return principal
            return None
        names = context.auth_context().get("x509_common_name") or []
        for name in names:
            principal = self._by_cert.get(name.decode())
            if principal:
                return principal
        return None


def ensure_dev_credentials(settings: Settings) -> dict[str, str]:
    """Development tokens, one per role plus "dev-all", kept in <data_dir>/dev-credentials.json."""
    path: Path = settings.dev_credentials_file
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {f"dev-{role}": secrets.token_urlsafe(32) for role in ROLES}
    tokens["dev-all"] = secrets.token_urlsafe(32)
    # Written to a temporary file, then linked into place: link() fails if another process got
    # there first, and a reader never sees a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(tokens, fh, indent=2)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return json.loads(path.read_text())
    finally:
        tmp.unlink()
    return tokens
