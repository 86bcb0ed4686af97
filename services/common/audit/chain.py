"""What the audit hash chain and its signatures cover: one definition shared by writer and verifier."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

# What the first record's hash chains to (its stored prev_hash is NULL).
GENESIS_HASH = hashlib.sha256(b"biogate-audit-genesis-v1").hexdigest()


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 as is: one text for one value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def format_ts(ts: datetime) -> str:
    if ts.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return ts.astimezone(timezone.utc).isoformat(timespec="microseconds")


def record_hash(
    seq: int,
    ts: datetime,
    event_type: str,
    actor: str,
    tenant_id: str | None,
    subject_pseudonym: str | None,
    details: str,
    prev_hash: str | None,
) -> str:
    """SHA-256 over every column of the record except the hash itself."""
    body = canonical_json(
        {
            "seq": seq,
            "ts": format_ts(ts),
            "event_type": event_type,
            "actor": actor,
            "tenant_id": tenant_id,
            "subject_pseudonym": subject_pseudonym,
            "details": details,
            "prev_hash": prev_hash or GENESIS_HASH,
        }
    )
    return hashlib.sha256(b"biogate-audit-record-v1\x00" + body.encode("utf-8")).hexdigest()


def row_hash(row: Any) -> str:
    return record_hash(
        row.seq, row.ts, row.event_type, row.actor, row.tenant_id, row.subject_pseudonym, row.details, row.prev_hash
    )


# Distinct prefixes: a checkpoint signature can never stand in for a head signature.
def head_message(seq: int, hash_: str) -> bytes:
    return f"biogate-audit-head-v1\x00{seq}\x00{hash_}".encode("ascii")


def checkpoint_message(seq: int, hash_: str, ts: datetime) -> bytes:
    return f"biogate-audit-checkpoint-v1\x00{seq}\x00{hash_}\x00{format_ts(ts)}".encode("ascii")
