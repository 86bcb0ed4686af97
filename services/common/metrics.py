"""Prometheus metrics shared by every service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

RPC_TOTAL = Counter("biogate_rpc_total", "RPCs handled", ["service", "method", "code"])
RPC_SECONDS = Histogram(
    "biogate_rpc_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_IN_FLIGHT = Gauge("biogate_rpc_in_flight", "RPCs being handled", ["service"])
MODEL_INFO = Info("biogate_model", "Models loaded and the inference provider each runs on")


def serve_metrics(host: str, port: int) -> None:
    start_http_server(port, addr=host)
