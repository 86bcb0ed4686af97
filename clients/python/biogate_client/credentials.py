"""How the SDK authenticates: a bearer token, mTLS (a client certificate), or both."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from ._api.wire import connect

DEV_CREDENTIALS = Path("var/dev-credentials.json")


@dataclass(frozen=True)
class Credentials:
    """``token``: a bearer token; ``ca_file``: the CA that signs the services' certificates (TLS);
    ``cert_file``/``key_file``: the client certificate and key (mTLS). All empty: plaintext
    without credentials (health only)."""

    token: str = ""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def channel(self, target: str) -> grpc.Channel:
        return connect(target, self.token or None, ca_file=self.ca_file, cert_file=self.cert_file,
                       key_file=self.key_file)


def dev_credentials(path: Path | str = DEV_CREDENTIALS, role: str = "dev-all") -> Credentials:
    """The development token of ``role`` (dev-enroller, dev-verifier, dev-orchestrator, dev-admin,
    dev-auditor, dev-service, dev-all) from the file a development server writes (var/dev-credentials.json)."""
    tokens = json.loads(Path(path).read_text())
    if role not in tokens:
        raise KeyError(f"{path} has no token for {role!r} (it has {', '.join(sorted(tokens))})")
    return Credentials(token=tokens[role])
