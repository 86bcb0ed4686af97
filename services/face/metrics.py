"""The face service's domain metrics (the shared ones are in services/common/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter

LIVENESS_REFUSALS = Counter(
    "biogate_face_liveness_refusals_total",
    "Faces the liveness layer refused (a presentation attack, or a genuine face it rejected), by RPC",
    ["rpc"],
)
