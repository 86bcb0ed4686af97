"""Counting the voice replay fingerprints per key in Redis (``keys list``, and ``keys retire`` inside its
database transaction): each member's header sliced in Redis, against every member fetched whole.

    .venv/bin/python -m bench.replay_key_usage [--fingerprints 100000] [--size 20000] [--rounds 3]

The local Redis (``BIOGATE_BENCH_REDIS``), under a key prefix of this run's own, deleted afterwards:
``--fingerprints`` records of ``--size`` bytes sealed by the real ``EnvelopeCrypto`` (a local keyring
in a temporary directory), 20 a subject (``voice.replay_max_per_subject``), stored by the real
``RedisReplayStore.add``. Timed, alternated ``--rounds`` times: ``RedisReplayStore.key_usage`` (the
headers) and the whole members read as it read them before (``_retained``, the re-wrap's walk), with
the bytes Redis sent for each (its ``total_net_output_bytes``: the whole server, idle otherwise), and
how long each of ``key_usage``'s script calls held Redis (``INFO commandstats``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from services.common.crypto import EnvelopeCrypto, LocalKeyring
from services.common.crypto.rotation import sealed_key_id
from services.voice.replay import RedisReplayStore, ReplayBinding

REDIS = os.environ.get("BIOGATE_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def whole(store: RedisReplayStore, batch: int = 200) -> Counter[str]:
    counts: Counter[str] = Counter()
    cursor = 0
    while True:
        cursor, found = store._retained(cursor, batch)
        counts.update(sealed_key_id(member[store._ID :]) for _, member in found)
        if not cursor:
            return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fingerprints", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    store = RedisReplayStore(REDIS, 30 * 86400, 20, prefix=f"biogate-bench:usage:{uuid.uuid4().hex[:10]}")
    try:
        with tempfile.TemporaryDirectory(dir=Path.cwd() / "var") as tmp:
            crypto = EnvelopeCrypto(LocalKeyring(Path(tmp) / "keyring.json"))
            record = os.urandom(a.size)
            t = time.perf_counter()
            for i in range(a.fingerprints):
                subject = f"cust-{i // 20}"
                store.add("bank-a", f"ps_{subject}", crypto.seal(ReplayBinding("bank-a", subject), record))
            print(f"stored {a.fingerprints:,} fingerprints of {a.size:,} bytes in {time.perf_counter() - t:.0f} s; "
                  f"Redis used_memory {store.client.info('memory')['used_memory_human']}")

        def sent() -> int:
            return int(store.client.info("stats")["total_net_output_bytes"])

        def script_calls() -> tuple[int, int]:
            stat = store.client.info("commandstats").get("cmdstat_evalsha", {})
            return int(stat.get("calls", 0)), int(stat.get("usec", 0))

        results: dict[str, list[tuple[float, int]]] = {"headers (key_usage)": [], "whole members (before)": []}
        expected = None
        for _ in range(a.rounds):
            for name, fn in (("headers (key_usage)", store.key_usage), ("whole members (before)", lambda: whole(store))):
                before, t = sent(), time.perf_counter()
                counts = fn()
                results[name].append((time.perf_counter() - t, sent() - before))
                assert expected is None or counts == expected, (counts, expected)
                expected = counts
        calls, usec = script_calls()
        store.key_usage()
        calls, usec = script_calls()[0] - calls, script_calls()[1] - usec
        print(f"counted {dict(expected or {})}; key_usage: {calls} script calls, {usec / max(1, calls) / 1000:.1f} ms "
              "each in Redis (no other client served meanwhile)")
        for name, runs in results.items():
            secs = sorted(s for s, _ in runs)
            print(f"{name}: {secs[0]:.2f}-{secs[-1]:.2f} s over {a.rounds} runs, Redis sent "
                  f"{max(b for _, b in runs) / 1e6:.1f} MB")
    finally:
        stale = list(store.client.scan_iter(f"{store.prefix}:*", count=1000))
        for i in range(0, len(stale), 1000):
            store.client.delete(*stale[i : i + 1000])


if __name__ == "__main__":
    main()
