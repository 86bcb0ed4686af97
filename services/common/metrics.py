"""Prometheus metrics shared by every service, and the HTTP endpoint that serves them. Each
service's own domain metrics are in services/<service>/metrics.py. Labels take values from small
fixed sets (services, RPCs, models, channels, reason codes), never ids or personal data."""

from __future__ import annotations

import socket
import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app, multiprocess
from prometheus_client.exposition import ThreadingWSGIServer

RPC_TOTAL = Counter("biogate_rpc_total", "RPCs handled", ["service", "method", "code"])
RPC_SECONDS = Histogram(
    "biogate_rpc_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# With several worker processes (prometheus-client's multiprocess mode) a scrape shows the sum over
# the live workers; a dead worker's calls in flight are no longer in flight.
RPC_IN_FLIGHT = Gauge("biogate_rpc_in_flight", "RPCs being handled", ["service"], multiprocess_mode="livesum")
RPC_SHED = Counter("biogate_rpc_shed_total", "Calls refused by admission control (RESOURCE_EXHAUSTED)",
                   ["service", "method", "reason"])
ADMISSION_QUEUED = Gauge("biogate_admission_queued", "Calls waiting for a model-work slot", ["service"],
                         multiprocess_mode="livesum")
# Not kept in multiprocess mode's files: the worker serving the scrapes adds its own (every worker
# loads the same models).
MODEL_INFO = Info("biogate_model", "Models loaded and the inference provider each runs on")

# Raw cosine similarity of each 1:1 comparison, before any normalisation: its distribution per model
# and channel drifts when the capture population or the pipeline changes (the matched half is
# mostly genuine attempts). Fine steps where genuine and impostor scores meet; negative scores
# (impostors only) fall in the first bucket, which keeps the histogram's _sum exported.
SCORE_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
                 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
SIMILARITY = Histogram("biogate_similarity_score", "Raw cosine similarity of 1:1 comparisons",
                       ["model", "channel", "result"], buckets=SCORE_BUCKETS)
# The micro-batchers (services/common/batching.py) and the models run outside them, by model.
BATCH_SIZE = Histogram("biogate_batch_size", "Items per model call of a micro-batcher", ["model"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
# Model runs on request threads (services/common/batching.py Inline): those under way, by model, and
# the admitted calls waiting for a run to finish because the process's bound on runs at a time (a
# memory bound: each run holds its activations, e.g. voice.max_inline_model_runs) is reached.
MODEL_RUNS_IN_FLIGHT = Gauge("biogate_model_runs_in_flight", "Inline model runs under way", ["model"],
                             multiprocess_mode="livesum")
MODEL_RUNS_WAITING = Gauge("biogate_model_runs_waiting", "Admitted calls waiting for the bound on inline model runs",
                           ["limit"], multiprocess_mode="livesum")
INFERENCE_SECONDS = Histogram(
    "biogate_inference_seconds", "Time of one model call (a whole batch)", ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Sessions of the PKCS#11 token logged in again after one was lost (an HSM restart or failover, a
# token reset): "ok", or "failed" when the token did not answer (its calls then fail UNAVAILABLE).
PKCS11_RECONNECTS = Counter("biogate_pkcs11_reconnects_total", "Reconnects of the PKCS#11 token's session",
                            ["outcome"])
# Operations refused because a key of the token fails while the token answers (its stored value
# unreadable, its type or attributes not those BioGate made), by key ("kek": a template
# key-encryption key, "signing": the audit or an MFA decision-token key, "pseudonym": the
# pseudonym root key): FAILED_PRECONDITION
# KEY_STORE_KEY_INVALID, never retryable, unlike the reconnects above.
PKCS11_KEY_FAILURES = Counter("biogate_pkcs11_key_failures_total",
                              "Operations refused because a key of the PKCS#11 token fails while the token answers",
                              ["key"])

# The audit trail's grouped commits (services/common/storage/audit.py): records per transaction
# outside callers' own transactions, i.e. how many appends waited for one another.
AUDIT_GROUP = Histogram("biogate_audit_group_records", "Audit records committed together in one transaction",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


# Audited writes refused because the trail records the destruction of the key this process signs
# with (services/common/audit/log.py): a process not restarted after `biogate audit switch-key`.
AUDIT_DESTROYED_KEY_REFUSALS = Counter(
    "biogate_audit_destroyed_key_refusals_total",
    "Audited writes refused: the audit key this process signs with was destroyed (restart it)")
# 1 from then on, in each such process: one routed around (NOT_SERVING) gets no calls to refuse.
AUDIT_KEY_DESTROYED = Gauge("biogate_audit_key_destroyed",
                            "1 while the audit key this process signs with was destroyed (restart it)",
                            multiprocess_mode="livemax")


# Verifications bounded by verify_limit (services/common/modality/attempts.py), by modality: those
# counted as failures (the comparison did not match, or liveness, spoof, replay or challenge refused
# it), and those refused VERIFY_LIMITED (the subject's failures in the window, with its attempts still
# running in the process, reached the limit). A tenant without a
# limit (evaluation trials, impostors by the thousand) is in neither. Neither tenant nor caller is
# a label (no metric here carries one): a credential spraying a tenant's subjects shows as a
# failure share of Verify's answers (biogate_rpc_total).
VERIFY_FAILURES = Counter("biogate_verify_failures_total",
                          "1:1 verifications counted as failures of the subject (no match, or refused as an attack)",
                          ["modality"])
VERIFY_LIMITED = Counter("biogate_verify_limited_total",
                         "Verifications refused VERIFY_LIMITED by the subject's bound on failures",
                         ["modality"])


def observe_similarity(model: str, channel: str, score: float, matched: bool) -> None:
    SIMILARITY.labels(model, channel, "match" if matched else "no_match").observe(score)


# The longest a connection to one of the small stdlib HTTP endpoints (these metrics, the MFA's JWKS)
# is held, request and answer together: each connection has a thread of its own, and a client
# sending a byte now and then (or nothing) held it for ever.
CONNECTION_S = 30.0


class QuietHandler(WSGIRequestHandler):
    """wsgiref's handler (one request a connection), unlogged, each connection held CONNECTION_S at
    most: every read and write under that timeout, and the connection shut down when it has passed."""

    timeout = CONNECTION_S

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(CONNECTION_S, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 - scrapes are not worth a log line each
        pass


def serve_metrics(host: str, port: int, accept: Callable[[str], bool] | None = None,
                  multiprocess_dir: str | None = None) -> ThreadingWSGIServer:
    """Serves the metrics on http://host:port/ from a daemon thread; -> the server (its
    ``server_port`` is the port bound when ``port`` is 0). With ``accept``, a scrape must send an
    ``Authorization`` header it accepts (the services' bearer tokens), else 401. With
    ``multiprocess_dir`` (the PROMETHEUS_MULTIPROC_DIR of a group of worker processes) a scrape
    shows every worker's metrics merged, not this process's alone."""
    app = make_wsgi_app(multiprocess_registry(multiprocess_dir)) if multiprocess_dir else make_wsgi_app()
    if accept is not None:
        app = _guarded(app, accept)
    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry of the metrics that the processes sharing ``path`` wrote (counters and histograms
    summed, gauges by their multiprocess_mode), and this process's model info."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)
    registry.register(MODEL_INFO)
    return registry


def _guarded(app, accept: Callable[[str], bool]):
    def guarded(environ, start_response):
        if accept(environ.get("HTTP_AUTHORIZATION", "")):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"send 'Authorization: Bearer <token>' of a configured principal\n"]

    return guarded
