"""The kiosk gateway's metrics (served on kiosk.metrics_port): requests refused by the per-client
rate limit, rate-limit store failures, frames refused while max_frames were held, connections
closed by the gateway's HTTP limits, and connections refused as they were accepted."""

from __future__ import annotations

from prometheus_client import Counter

RATE_LIMITED = Counter("biogate_kiosk_rate_limited_total",
                       "Requests answered 429 because a client's token bucket was empty, by the bucket "
                       "(address: the source address; device: the kiosk device)", ["bucket"])
RATE_LIMIT_STORE_ERRORS = Counter("biogate_kiosk_rate_limit_store_errors_total",
                                  "Requests the shared rate-limit store (Redis) failed on; they were charged to "
                                  "this process's buckets")
FRAMES_BUSY = Counter("biogate_kiosk_frames_busy_total",
                      "Face frames answered 503 because kiosk.http.max_frames were being handled already")
CONNECTIONS_CLOSED = Counter("biogate_kiosk_connections_closed_total",
                             "Connections the gateway closed by its HTTP limits (head_timeout, body_timeout: 408; "
                             "lingering: closed after an answer while the request body was still coming)",
                             ["reason"])
CONNECTIONS_REFUSED = Counter("biogate_kiosk_connections_refused_total",
                              "Connections answered 503 and closed as they were accepted (per_address: the "
                              "client address held kiosk.http.max_connections_per_ip already; total: the gateway "
                              "held kiosk.http.max_connections)", ["reason"])
