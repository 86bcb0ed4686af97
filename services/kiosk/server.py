"""The kiosk gateway as a running HTTP server (uvicorn in a thread), built from the ``kiosk``
settings, and the `biogate kiosk` command that runs it until SIGTERM."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable

import grpc
import uvicorn
from prometheus_client.exposition import ThreadingWSGIServer

from services.common.api.v1 import mfa_pb2_grpc
from services.common.client import connect
from services.common.files import private_dir
from services.common.metrics import serve_metrics
from services.kiosk.config import KioskSettings
from services.kiosk.gateway import create_app
from services.kiosk.http import protocol_class
from services.kiosk.ratelimit import RateLimiter

log = logging.getLogger("biogate.kiosk")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kiosk", help="run the kiosk gateway (REST for the MFA's face login, and the kiosk page)")
    p.set_defaults(func=serve)


def client_key_digest(settings: KioskSettings) -> tuple[str, str | None]:
    """(SHA-256 of the browser's key, the key itself when it was generated here for development)."""
    if settings.kiosk.client_key_sha256:
        return settings.kiosk.client_key_sha256.lower(), None
    path = private_dir(settings.data_dir) / "kiosk-key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    key = path.read_text().strip()
    return hashlib.sha256(key.encode()).hexdigest(), key


class KioskServer:
    """The gateway on ``kiosk.host:kiosk.port`` (0: a port the OS chooses), serving from a thread."""

    def __init__(self, settings: KioskSettings, digest: str, port: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``clock``: the rate limit's (seconds)."""
        cfg = settings.kiosk
        if not cfg.mfa_token and not cfg.cert_file:
            raise ValueError("kiosk.mfa_token (or kiosk.cert_file): the credentials of this kiosk's terminal "
                             "principal at the MFA are not set")
        limiter = RateLimiter(cfg.rate_limit, clock)  # before the channel: a bad store stops the start here
        endpoint = settings.server.mfa
        target = cfg.mfa_target or f"{endpoint.host}:{endpoint.port}"
        self.channel: grpc.Channel = connect(target, cfg.mfa_token or None, ca_file=cfg.ca_file,
                                             cert_file=cfg.cert_file, key_file=cfg.key_file)
        try:
            app = create_app(mfa_pb2_grpc.MfaServiceStub(self.channel), cfg.tenant, digest, cfg.deadline_s,
                             cfg.max_image_bytes, limiter, cfg.http.max_frames, cfg.allowed_hosts)
        except ValueError:
            self.channel.close()
            raise
        limits = cfg.http
        self.server = uvicorn.Server(uvicorn.Config(
            app, host=cfg.host, port=cfg.port if port is None else port, log_config=None, access_log=False,
            lifespan="off", http=protocol_class(limits, cfg.rate_limit.ipv6_prefix_length), server_header=False,
            timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
            # never reached (the protocol refuses the connection beyond max_connections, in JSON): a backstop
            limit_concurrency=limits.max_connections + 1,
            proxy_headers=bool(cfg.forwarded_allow_ips), forwarded_allow_ips=cfg.forwarded_allow_ips or None))
        self._thread = threading.Thread(target=self.server.run, name="kiosk-http", daemon=True)
        self.url = ""
        self._metrics_at = (cfg.metrics_host, cfg.metrics_port)
        self.metrics: ThreadingWSGIServer | None = None

    def start(self, timeout: float = 30.0) -> KioskServer:
        self._thread.start()
        ready = threading.Event()
        while not self.server.started and self._thread.is_alive():
            ready.wait(0.02)  # uvicorn has no started event to wait on
        if not self.server.started:
            raise OSError("the kiosk gateway did not start (kiosk.host / kiosk.port in use?)")
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        metrics_host, metrics_port = self._metrics_at
        if metrics_port is not None:
            self.metrics = serve_metrics(metrics_host, metrics_port)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self.channel.close()
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics.server_close()


def serve(settings: KioskSettings, args: argparse.Namespace) -> int:
    digest, key = client_key_digest(settings)
    server = KioskServer(settings, digest).start()
    # development only: with a configured key digest the launcher already knows the key
    print(f"biogate: kiosk gateway on {server.url}" + (f" (open {server.url}/#key={key})" if key else ""), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0
