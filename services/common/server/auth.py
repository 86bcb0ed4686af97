"""Caller authentication: bearer tokens and mTLS client certificates mapped to principals.

A client certificate (already verified against ``server.tls.client_ca_file`` by the TLS handshake,
which refuses unknown and expired ones) is identified by its URI SANs (SPIFFE IDs) and DNS SANs;
its CN only when it has neither (RFC 6125: a CN beside SANs is not an identity).

Certificate and token on one call: the certificate identifies the calling workload. A
certificate that maps to a principal decides who calls; a bearer token sent along must belong
to the same principal or the call is refused (UNAUTHENTICATED), so a token stolen from another
caller cannot lend its roles to this workload. A certificate that maps to no principal (a
member of the bank's PKI without a BioGate identity) only protects the transport; the token
then identifies the caller.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from functools import lru_cache
from pathlib import Path

import grpc
from cryptography import x509

from services.common import errors
from services.common.config import CommonSettings, loopback_host
from services.common.context import Principal

ROLES = ("enroller", "verifier", "orchestrator", "admin", "auditor", "service")


def refuse_dev_credentials_off_loopback(settings: CommonSettings, host: str, what: str) -> None:
    """Development tokens (every role, every tenant, kept in a file) are for one machine: a server
    reachable from others must name its principals."""
    if settings.auth.principals or not settings.auth.dev_credentials:
        return
    if not loopback_host(host):
        raise ValueError(f"{what} listens on {host}, beyond this machine, with development credentials (no "
                         "auth.principals): configure auth.principals and set auth.dev_credentials false, or bind "
                         "127.0.0.1")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Resolves the caller of an RPC from its metadata or its TLS peer certificate."""

    def __init__(self, principals: list[tuple[Principal, str | None, str | None]]) -> None:
        # (principal, token sha256, certificate subject)
        self._by_token = {t: p for p, t, _ in principals if t}
        self._by_cert = {c: p for p, _, c in principals if c}

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> "Authenticator":
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
        """The caller, or None when it sent no credentials the server knows. Raises
        ServiceError(UNAUTHENTICATED) when certificate and token name different principals."""
        # grpc's stubs say Mapping[str, bytes]; the runtime gives each property a list of values.
        by_cert = self._cert_principal(context.auth_context())  # type: ignore[arg-type]
        metadata = dict(context.invocation_metadata())
        auth = metadata.get("authorization", "")
        if not isinstance(auth, str) or not auth.lower().startswith("bearer "):  # bytes only for -bin keys
            return by_cert
        by_token = self._token_principal(auth[7:].strip())
        if by_cert is None:
            return by_token
        if by_token is None or by_token.name != by_cert.name:
            raise errors.unauthenticated(
                f"the bearer token does not belong to '{by_cert.name}', whom the client certificate "
                "identifies; send no token on an mTLS connection, or the certificate's own",
                reason="CERTIFICATE_TOKEN_MISMATCH",
            )
        return by_cert

    def _token_principal(self, token: str) -> Principal | None:
        digest = token_sha256(token)
        for known, principal in self._by_token.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None

    def _cert_principal(self, auth_context: dict[str, list[bytes]]) -> Principal | None:
        pems = auth_context.get("x509_pem_cert") or []
        if not pems:
            return None
        for name in certificate_identities(pems[0]):
            principal = self._by_cert.get(name)
            if principal:
                return principal
        return None


@lru_cache(maxsize=256)
def certificate_identities(pem: bytes) -> tuple[str, ...]:
    """The names a client certificate identifies its holder by: URI SANs, then DNS SANs; the CN
    only when there are none of those."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.UniformResourceIdentifier), *san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if names:
        return tuple(names)
    return tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME))


def ensure_dev_credentials(settings: CommonSettings) -> dict[str, str]:
    """Development tokens, one per role plus "dev-all", kept in <data_dir>/dev-credentials.json."""
    path: Path = settings.dev_credentials_file
    if path.exists():
        tokens = json.loads(path.read_text())
        return tokens if all(f"dev-{role}" in tokens for role in ROLES) else _add_dev_roles(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {f"dev-{role}": secrets.token_urlsafe(32) for role in ROLES}
    tokens["dev-all"] = secrets.token_urlsafe(32)
    # Written to a temporary file, then linked into place: link() fails if another process got
    # there first, and a reader never sees a half-written file.
    tmp = _written_beside(path, tokens)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return json.loads(path.read_text())
    finally:
        tmp.unlink()
    return tokens


def _add_dev_roles(path: Path) -> dict[str, str]:
    """A file written before a role existed gets that role's token; the others keep theirs. One
    process at a time (a lock file beside it), and the file is replaced whole, never half-written."""
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tokens = json.loads(path.read_text())
        missing = [role for role in ROLES if f"dev-{role}" not in tokens]
        if missing:
            tokens.update({f"dev-{role}": secrets.token_urlsafe(32) for role in missing})
            os.replace(_written_beside(path, tokens), path)
        return tokens


def _written_beside(path: Path, tokens: dict[str, str]) -> Path:
    """``tokens`` in a temporary file next to ``path``, readable by this user only (to be moved in)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(tokens, fh, indent=2)
    return tmp
