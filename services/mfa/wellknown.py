"""Standard token verification over HTTP: ``/.well-known/jwks.json`` (the decision tokens' public
keys, as MfaService.GetSigningKeys returns them) and ``/.well-known/openid-configuration`` (an
OpenID-style discovery document naming the issuer, the JWKS URL and the algorithms), so that a
relying party verifies a decision token with a stock JWT library and a URL (e.g. PyJWT's
``PyJWKClient``) instead of an authenticated gRPC call.

Public data only, read-only, no credentials: a threaded stdlib WSGI server (as the metrics endpoint,
with its handler: a connection held metrics.CONNECTION_S at most), because two small JSON documents
need no web framework inside the gRPC process. It starts and stops
with the MFA service (ServiceDefinition.start / close).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client.exposition import ThreadingWSGIServer

from services.common.metrics import QuietHandler
from services.mfa.config import HttpConfig
from services.mfa.tokens import ALGORITHMS, SigningKeys

JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Relying parties cache the key set; a rotated key is published at once and the old one kept until
# its tokens expire (tokens.py), so a short cache lifetime is enough.
CACHE_S = 300


def discovery(issuer: str, base_url: str, algorithms: Iterable[str]) -> dict[str, Any]:
    """What a relying party needs to verify decision tokens; no authorization or token endpoint
    exists (decisions come from MfaService.Decide), so none is named."""
    return {
        "issuer": issuer,
        "jwks_uri": base_url.rstrip("/") + JWKS_PATH,
        "id_token_signing_alg_values_supported": list(algorithms),
        "subject_types_supported": ["pairwise"],  # sub is the subject's keyed pseudonym per tenant
        "claims_supported": ["iss", "aud", "sub", "sid", "act", "amt", "pay", "decision", "amr", "acr", "fac",
                             "pol", "iat", "nbf", "exp", "jti"],
        "decision_values_supported": ["allow"],  # no token is issued for any other outcome (tokens.py)
    }


def wsgi_app(keys: SigningKeys, issuer: str, base_url: Callable[[], str]):
    def app(environ, start_response):
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "")
        if path == JWKS_PATH:
            body: dict[str, Any] = keys.jwks()
        elif path == DISCOVERY_PATH:
            body = discovery(issuer, base_url(), ALGORITHMS)
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [f"not found: the MFA serves {JWKS_PATH} and {DISCOVERY_PATH}\n".encode()]
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"read-only: use GET\n"]
        data = json.dumps(body, separators=(",", ":")).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                                  ("Cache-Control", f"public, max-age={CACHE_S}"),
                                  ("Access-Control-Allow-Origin", "*")])
        return [] if method == "HEAD" else [data]

    return app


class WellKnownServer:
    """The HTTP endpoint, bound by start() and closed by close()."""

    def __init__(self, cfg: HttpConfig, keys: SigningKeys, issuer: str) -> None:
        self.cfg, self.keys, self.issuer = cfg, keys, issuer
        self._server: ThreadingWSGIServer | None = None

    @property
    def base_url(self) -> str:
        if self.cfg.public_url:
            return self.cfg.public_url.rstrip("/")
        if self._server is None:
            return f"http://{self.cfg.host}:{self.cfg.port}"
        return f"http://{self.cfg.host}:{self._server.server_port}"

    def start(self) -> None:
        try:
            self._server = make_server(self.cfg.host, self.cfg.port, wsgi_app(self.keys, self.issuer,
                                                                              lambda: self.base_url),
                                       ThreadingWSGIServer, handler_class=QuietHandler)
        except OSError as exc:
            raise OSError(f"cannot listen on {self.cfg.host}:{self.cfg.port} for the MFA's JWKS endpoint "
                          f"(mfa.http.port; port in use?): {exc.strerror}") from None
        threading.Thread(target=self._server.serve_forever, name="mfa-wellknown", daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
