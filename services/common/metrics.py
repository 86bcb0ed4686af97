"""Prometheus metrics shared by every service, and the HTTP endpoint that serves them."""

from __future__ import annotations

import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

RPC_TOTAL = Counter("biogate_rpc_total", "RPCs handled", ["service", "method", "code"])
RPC_SECONDS = Histogram(
    "biogate_rpc_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_IN_FLIGHT = Gauge("biogate_rpc_in_flight", "RPCs being handled", ["service"])
RPC_SHED = Counter("biogate_rpc_shed_total", "Calls refused by admission control (RESOURCE_EXHAUSTED)",
                   ["service", "method", "reason"])
ADMISSION_QUEUED = Gauge("biogate_admission_queued", "Calls waiting for a model-work slot", ["service"])
MODEL_INFO = Info("biogate_model", "Models loaded and the inference provider each runs on")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - scrapes are not worth a log line each
        pass


def serve_metrics(host: str, port: int, accept: Callable[[str], bool] | None = None) -> ThreadingWSGIServer:
    """Serves the metrics on http://host:port/ from a daemon thread; -> the server (its
    ``server_port`` is the port bound when ``port`` is 0). With ``accept``, a scrape must send an
    ``Authorization`` header it accepts (the services' bearer tokens), else 401."""
    app = make_wsgi_app()
    if accept is not None:
        app = _guarded(app, accept)
    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _guarded(app, accept: Callable[[str], bool]):
    def guarded(environ, start_response):
        if accept(environ.get("HTTP_AUTHORIZATION", "")):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"send 'Authorization: Bearer <token>' of a configured principal\n"]

    return guarded
