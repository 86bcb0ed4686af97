"""Where the face service's open-loop tail comes from (issue 13): one open loop at a share of the
closed-loop rate, with every slow call laid beside what happened in the service at that moment.

The service runs as in bench.face_bench (own process, default models, `serve face`), but started
through this module's probe, which before the server starts records, on the one monotonic clock
that the load generator reads too:
  - every cyclic-GC collection (gc.callbacks): start, end, generation, collected objects;
  - every model-work RPC (the interceptor's call): its x-request-id, when the handler thread took
    it, how long it waited for an admission slot, when it finished, and the thread CPU time it
    used (inline model runs are on that thread: wall >> CPU means it waited for a core or the GIL);
  - every inline model call (services.common.batching.Inline) and audit append: thread, wall (and CPU) time;
  - once SERVING, what two full collections cost and how many objects are frozen (server.gc_freeze_after_warm_up).
The load generator records each call's issue and answer times, its own GC collections, and a
sampler thread reads /proc every 50 ms: the machine's busy CPU and steal, the service's and its
own, so that the rest is other processes'.

For the slowest 1 % of calls it reports which overlap a GC collection (service or client), their
admission wait against their handling time, their thread's CPU against wall time, the CPU the
others took meanwhile and their place in the cycle of probes (--order, as bench.face_bench); the
same for the median calls as the reference; and the bursts they come in, with what preceded each.

    .venv/bin/python -m bench.face_tail [--duration 15] [--open-seconds 60] [--rate R] [--raw-seconds 5]
        [--order file|shuffled] [--json FILE]
    .venv/bin/python -m bench.face_tail --replay FILE.json...   (a 2-slot queue model of the probe order, below)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.face_bench import ParallelRaw, enrol, plain_requests, run_load, trial_pairs
from bench.harness import MODEL_CACHE, GcLog, ServiceProcess, cpu_seconds, pct, write_json
from bench.loadgen import OPEN_LOOP_SHARE, run_open_loop
from services.common.api.v1 import face_pb2_grpc

PROBE_ENV = "BIOGATE_TAIL_PROBE"  # where the probed service writes its records at exit


# ---------------------------------------------------------------- in the service process
def probe_serve(argv: list[str]) -> int:
    """`biogate ARGV` with the records above, written as JSON to $BIOGATE_TAIL_PROBE at exit."""
    from services import cli
    from services.common import batching, context
    from services.common.server import bootstrap, interceptor
    from services.common.storage import audit

    out = os.environ[PROBE_ENV]
    gc_log = GcLog().install()
    calls: list[dict] = []
    models: list[tuple[int, float, float, float]] = []
    enter, admit, finish = interceptor._Call.__enter__, interceptor._Call.admit, interceptor._Call._finish
    submit_many = batching.Inline.submit_many
    append = audit.SqlAuditRepository.append
    audits: list[tuple[int, float, float]] = []

    def p_enter(self):
        r = enter(self)
        self._probe = {"rid": context.request_id.get(), "tid": threading.get_ident(), "enter": time.perf_counter(),
                       "cpu0": time.thread_time()}
        return r

    def p_admit(self):
        t = time.perf_counter()
        try:
            admit(self)
        finally:
            self._probe["admit"], self._probe["started"] = t, time.perf_counter()

    def p_finish(self, code):
        p = self._probe
        p["finish"], p["cpu1"], p["code"] = time.perf_counter(), time.thread_time(), code.name
        finish(self, code)
        if self.queue is not None:
            calls.append(p)

    def p_submit_many(self, items, timeout=None):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return submit_many(self, items, timeout)
        finally:
            models.append((threading.get_ident(), t, time.perf_counter(), time.thread_time() - c))

    def p_append(self, build, check_tail=None):
        t = time.perf_counter()
        try:
            return append(self, build, check_tail)
        finally:
            audits.append((threading.get_ident(), t, time.perf_counter()))

    audit.SqlAuditRepository.append = p_append  # type: ignore[method-assign]
    warm_up = bootstrap.RunningServer._warm_up
    full: list[float] = []
    frozen: list[int] = []

    def p_warm_up(self):
        warm_up(self)
        # What a full collection costs once serving (with or without the freeze): the pause a
        # gen-2 collection would put on every thread; the second one walks the heap alone.
        for _ in range(2):
            t = time.perf_counter()
            gc.collect()
            full.append((time.perf_counter() - t) * 1000)
        frozen.append(gc.get_freeze_count())

    bootstrap.RunningServer._warm_up = p_warm_up  # type: ignore[method-assign]
    interceptor._Call.__enter__, interceptor._Call.admit, interceptor._Call._finish = p_enter, p_admit, p_finish  # type: ignore[method-assign]  # the probes
    batching.Inline.submit_many = p_submit_many  # type: ignore[method-assign]

    def dump() -> None:
        Path(out).write_text(json.dumps({"gc": gc_log.events, "calls": calls, "models": models, "audits": audits,
                                         "full_collection_ms": full, "gc_threshold": gc.get_threshold(),
                                         "gc_frozen": frozen, "gc_tracked": len(gc.get_objects())}))

    atexit.register(dump)
    return cli.main(argv)


class ProbedService(ServiceProcess):
    """A ServiceProcess started through :func:`probe_serve`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probe_file = self.dir / "probe.json"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.face_tail", "--probe-serve", *super().command()[3:]]

    def environment(self) -> dict[str, str]:
        return {**os.environ, PROBE_ENV: str(self.probe_file)}

    def records(self) -> dict:
        self.stop()
        return json.loads(self.probe_file.read_text())


# ---------------------------------------------------------------- in the load generator
class Sampler:
    """Every ``interval_s``: busy jiffies of the machine (all cores), of the service, of this process."""

    def __init__(self, service_pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s = service_pid, interval_s
        self.rows: list[tuple[float, float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _busy() -> tuple[float, float]:
        """(busy, steal) seconds of all cores; busy less idle, iowait and steal (the hypervisor's other guests)."""
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        return (sum(values[:8]) - values[3] - values[4] - values[7]) / tick, values[7] / tick

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.rows.append((time.perf_counter(), *self._busy(), cpu_seconds(self.pid), cpu_seconds(os.getpid())))

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> "Sampler":
        self._stop.set()
        self._thread.join()
        return self

    def others_share(self, t0: float, t1: float) -> tuple[float, float, float, float]:
        """Cores' worth used by (other processes, steal, the service, the client) over the samples around [t0, t1]."""
        rows = [r for r in self.rows if t0 - self.interval_s <= r[0] <= t1 + self.interval_s]
        if len(rows) < 2:
            return float("nan"), float("nan"), float("nan"), float("nan")
        dt = rows[-1][0] - rows[0][0]
        busy, steal, svc, cli = (rows[-1][k] - rows[0][k] for k in (1, 2, 3, 4))
        return (busy - svc - cli) / dt, steal / dt, svc / dt, cli / dt


async def open_loop(address: str, token: str, requests: list, connections: int, rate: float, duration: float):
    """bench.face_bench's open loop, each call tagged with its index as x-request-id: (result, issue/answer times)."""
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [face_pb2_grpc.FaceServiceStub(c) for c in channels]
    times: dict[int, tuple[float, float]] = {}

    async def call(i: int, timeout: float):
        t = time.perf_counter()
        try:
            return await stubs[i % connections].Verify(
                requests[i % len(requests)], timeout=timeout,
                metadata=(("authorization", f"Bearer {token}"), ("x-request-id", f"tail{i}")))
        finally:
            times[i] = (t, time.perf_counter())

    try:
        result = await run_open_loop(call, rate_per_s=rate, duration_s=duration, deadline_s=30.0,
                                     max_requests=int(rate * duration) + 1)
    finally:
        for channel in channels:
            await channel.close()
    return result, times


def overlaps(events, t0: float, t1: float) -> list:
    return [e for e in events if e[0] < t1 and e[1] > t0]


def analyse(times: dict[int, tuple[float, float]], records: dict, client_gc: GcLog, sampler: Sampler,
            sizes: list[int]) -> dict:
    calls = {int(c["rid"][4:]): c for c in records["calls"] if str(c["rid"]).startswith("tail")}
    rows = []
    for i, (t0, t1) in times.items():
        c = calls.get(i)
        if c is None or c["code"] != "OK":
            continue
        svc_gc = overlaps(records["gc"], t0, t1)
        cli_gc = overlaps(client_gc.events, t0, t1)
        models = [m for m in records["models"] if m[0] == c["tid"] and c["enter"] <= m[1] <= c["finish"]]
        appends = [a for a in records["audits"] if a[0] == c["tid"] and c["enter"] <= a[1] <= c["finish"]]
        others, steal, svc_cores, cli_cores = sampler.others_share(t0, t1)
        rows.append({
            "i": i, "cycle_place": i % len(sizes), "probe_kb": sizes[i % len(sizes)] / 1024, "latency_ms": (t1 - t0) * 1000,
            "before_handler_ms": (c["enter"] - t0) * 1000,  # client send, gRPC receive, thread pool dispatch
            "admission_wait_ms": (c["started"] - c["admit"]) * 1000,
            "handling_ms": (c["finish"] - c["started"]) * 1000,  # under the slot
            "after_handler_ms": (t1 - c["finish"]) * 1000,  # response, gRPC, client wake-up
            "thread_cpu_ms": (c["cpu1"] - c["cpu0"]) * 1000,
            "model_wall_ms": sum(m[2] - m[1] for m in models) * 1000,
            "model_cpu_ms": sum(m[3] for m in models) * 1000,
            "audit_ms": sum(a[2] - a[1] for a in appends) * 1000,
            "service_gc_ms": sum(min(e[1], t1) - max(e[0], t0) for e in svc_gc) * 1000,
            "service_gc_gens": sorted({e[2] for e in svc_gc}),
            "client_gc_ms": sum(min(e[1], t1) - max(e[0], t0) for e in cli_gc) * 1000,
            "others_cores": others, "steal_cores": steal, "service_cores": svc_cores, "client_cores": cli_cores,
            "issued_s": t0,
        })
    rows.sort(key=lambda r: r["latency_ms"])
    n = len(rows)
    slow = rows[int(n * 0.99):] if n else []
    mid = rows[int(n * 0.45): int(n * 0.55)] if n else []

    def summary(group: list[dict]) -> dict:
        keys = ["probe_kb", "latency_ms", "before_handler_ms", "admission_wait_ms", "handling_ms", "after_handler_ms",
                "thread_cpu_ms", "model_wall_ms", "model_cpu_ms", "audit_ms", "service_gc_ms", "client_gc_ms",
                "others_cores", "steal_cores", "service_cores", "client_cores"]
        out: dict = {"calls": len(group)}
        for k in keys:
            out[k] = round(float(np.nanmedian([r[k] for r in group])), 2) if group else float("nan")
        out["with_service_gc"] = sum(1 for r in group if r["service_gc_ms"] > 0)
        out["with_service_gc2"] = sum(1 for r in group if 2 in r["service_gc_gens"])
        out["with_client_gc"] = sum(1 for r in group if r["client_gc_ms"] > 0)
        return out

    window = (min(t for t, _ in times.values()), max(t for _, t in times.values())) if times else (0.0, 0.0)
    gcs = overlaps(records["gc"], *window)  # the open loop's, not start-up's or enrolment's
    by_gen = {g: [(e[1] - e[0]) * 1000 for e in gcs if e[2] == g] for g in (0, 1, 2)}
    episodes: list[dict] = []  # the slowest calls in bursts (< 1 s apart), and what came just before each burst's first call
    for r in sorted(slow, key=lambda r: r["issued_s"]):
        if episodes and r["issued_s"] - episodes[-1]["last"] < 1.0:
            episodes[-1]["last"] = r["issued_s"]
            episodes[-1]["calls"] += 1
            continue
        t = r["issued_s"]
        before = [x for x in rows if t - 0.5 <= x["issued_s"] <= t]
        others, steal, svc_cores, cli_cores = sampler.others_share(t - 0.5, t)
        episodes.append({
            "first": t, "last": t, "calls": 1,
            "gc_before": [(round(e[0] - t, 3), round((e[1] - e[0]) * 1000, 1), e[2])
                          for e in overlaps(records["gc"], t - 0.5, t + 0.2) if e[1] - e[0] > 0.002],
            "client_gc_before": [(round(e[0] - t, 3), round((e[1] - e[0]) * 1000, 1), e[2])
                                 for e in overlaps(client_gc.events, t - 0.5, t + 0.2) if e[1] - e[0] > 0.002],
            "audits_over_10ms_before": [(round(a[1] - t, 3), round((a[2] - a[1]) * 1000, 1)) for a in records["audits"]
                                        if t - 0.5 <= a[1] <= t + 0.2 and a[2] - a[1] > 0.01],
            "handling_ms_max_before": round(max((x["handling_ms"] for x in before), default=float("nan")), 1),
            "thread_cpu_ms_max_before": round(max((x["thread_cpu_ms"] for x in before), default=float("nan")), 1),
            "cores_before": {"others": round(others, 2), "steal": round(steal, 2), "service": round(svc_cores, 2),
                             "client": round(cli_cores, 2)},
        })
    for e in episodes:
        e["first"], e["last"] = round(e["first"] - window[0], 2), round(e["last"] - window[0], 2)
    audit_ms = sorted((a[1] - a[0]) * 1000 for a in overlaps([a[1:] for a in records["audits"]], *window))
    return {
        "calls_ok": n,
        "audit_appends": {"count": len(audit_ms), "p50_ms": round(float(np.median(audit_ms)), 2) if audit_ms else None,
                          "p99_ms": round(float(np.percentile(audit_ms, 99)), 2) if audit_ms else None,
                          "over_20ms": sum(1 for a in audit_ms if a > 20), "max_ms": round(max(audit_ms, default=0), 1)},
        "p50_ms": round(pct([r["latency_ms"] / 1000 for r in rows], 50), 1),
        "p99_ms": round(pct([r["latency_ms"] / 1000 for r in rows], 99), 1),
        "service_gc": {f"gen{g}": {"count": len(v), "p50_ms": round(float(np.median(v)), 2) if v else None,
                                   "max_ms": round(max(v), 2) if v else None, "total_ms": round(sum(v), 1)}
                       for g, v in by_gen.items()},
        "service_gc_threshold": records["gc_threshold"], "service_gc_frozen_once_serving": records["gc_frozen"],
        "service_gc_tracked_at_exit": records["gc_tracked"],
        "service_full_collection_ms_once_serving": [round(ms, 1) for ms in records["full_collection_ms"]],
        # (s from the open loop's start, ms): start-up, enrolment and the timed collections are before 0
        "service_gen2_s_ms": [(round(e[0] - window[0], 2), round((e[1] - e[0]) * 1000, 1))
                              for e in records["gc"] if e[2] == 2],
        "client_gc": client_gc.summary(),
        # the cycle's 8 large photos (150-755 KB) against the rest: each call's own CPU and handling
        "by_probe_size": {k: {"calls": len(g), "thread_cpu_ms_p50": round(float(np.median([r["thread_cpu_ms"] for r in g])), 1),
                              "handling_ms_p50": round(float(np.median([r["handling_ms"] for r in g])), 1)}
                          for k, g in (("over_150kb", [r for r in rows if r["probe_kb"] > 150]),
                                       ("up_to_150kb", [r for r in rows if r["probe_kb"] <= 150])) if g},
        "slowest_1pct": summary(slow), "median_band": summary(mid), "episodes": episodes,
        "rows": [[round(r["issued_s"] - window[0], 3), round(r["latency_ms"], 1), round(r["admission_wait_ms"], 1),
                  round(r["handling_ms"], 1), round(r["thread_cpu_ms"], 1), round(r["audit_ms"], 1)] for r in rows],
        "slowest_rows": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in slow],
    }


def replay(files: list[str], share: float = OPEN_LOOP_SHARE, seconds: float = 60.0, servers: int = 2) -> dict:
    """A model, not a measurement: each place of the probe cycle costs the median thread CPU its calls
    had in file-order runs (``files``, this script's JSON), served first come first served by
    ``servers`` slots that never slow each other, arriving at fixed intervals at ``share`` of that
    capacity. What the cycle's order alone does to p99 / p50, without the machine's noise."""
    cpu: dict[int, list[float]] = {}
    for f in files:
        d = json.loads(Path(f).read_text())
        for t, _lat, _wait, _handling, c, _audit in d["rows"]:
            cpu.setdefault(round(t * d["rate_per_s"]) % 98, []).append(c)
    costs = np.array([np.median(cpu[p]) for p in range(98)]) / 1000
    out: dict[str, Any] = {"cpu_ms_mean": round(float(costs.mean()) * 1000, 1)}
    for name, s in (("file", costs), ("shuffled", costs[np.random.default_rng(0).permutation(98)]),
                    ("every probe at the median", np.full(98, np.median(costs)))):
        rate = share * servers / float(s.mean())
        free, latencies = [0.0] * servers, []
        for i in range(int(rate * seconds)):
            k = min(range(servers), key=free.__getitem__)
            free[k] = max(i / rate, free[k]) + s[i % 98]
            latencies.append(free[k] - i / rate)
        p50, p99 = pct(latencies, 50), pct(latencies, 99)
        out[name] = {"rate_per_s": round(rate, 1), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1),
                     "p99_over_p50": round(p99 / p50, 2)}
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe-serve":
        return probe_serve(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--replay":
        print(json.dumps(replay(sys.argv[2:]), indent=1))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15.0, help="closed loop at concurrency 8 for the rate")
    ap.add_argument("--rate", type=float, default=None, help="open-loop rate per s (default: 80 %% of the closed loop)")
    ap.add_argument("--open-seconds", type=float, default=60.0)
    ap.add_argument("--raw-seconds", type=float, default=0.0,
                    help="as bench.face_bench: the raw models on every core in this process for this long between "
                         "the closed and the open loop (the service idles; the load generator holds the models)")
    ap.add_argument("--order", choices=("file", "shuffled"), default="file", help="as bench.face_bench")
    ap.add_argument("--config", default="{}", help="service configuration overrides, JSON")
    ap.add_argument("--json", default=None, help="write the full analysis here")
    args = ap.parse_args()

    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    images, pairs = trial_pairs()
    datas = [p.read_bytes() for p in images]
    requests = plain_requests(datas, pairs, args.order)
    ceiling = None
    if args.raw_seconds > 0:
        from services.common.models import ModelStore
        from services.settings import load_config

        store = ModelStore(load_config(None, models={"cache_dir": str(MODEL_CACHE)}))
        ceiling = ParallelRaw(store, [datas[p] for _, p in pairs], False)
    with tempfile.TemporaryDirectory(prefix="face-tail-") as tmp:
        svc = ProbedService("face", json.loads(args.config), data_dir=Path(tmp))
        try:
            svc.start()
            channel, _, _ = enrol(svc, datas)
            channel.close()
            asyncio.run(run_load(svc.address, svc.token(), requests, 8, 2.0, 50))  # warm the path
            rate = args.rate
            if rate is None:
                run = asyncio.run(run_load(svc.address, svc.token(), requests, 8, args.duration, 5000))
                lat, wall = run.latencies_s, run.wall_s
                rate = OPEN_LOOP_SHARE * len(lat) / wall
                print(f"closed loop c=8: {len(lat) / wall:.1f}/s, p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, "
                      f"errors {dict(run.errors)}, refused {dict(run.refused)}", flush=True)
            if ceiling is not None:
                print(f"raw models on every core: {ceiling.rate(False, args.raw_seconds):.1f}/s", flush=True)
            client_gc = GcLog().install()
            sampler = Sampler(svc.proc.pid).start()  # type: ignore[union-attr]
            cpu0 = svc.cpu_seconds()
            result, times = asyncio.run(open_loop(svc.address, svc.token(), requests, 8, rate, args.open_seconds))
            svc_cpu = (svc.cpu_seconds() - cpu0) / max(1, len(result.outcomes))
            sampler.stop()
            client_gc.remove()
            records = svc.records()
        finally:
            svc.stop()
            if ceiling is not None:
                ceiling.p.close()
    report = analyse(times, records, client_gc, sampler, [len(r.image.data) for r in requests])
    report.update({"rate_per_s": round(rate, 2), "open_seconds": args.open_seconds,
                   "codes": dict(Counter(o.code for o in result.outcomes)),
                   "tail_ratio": round(result.tail_ratio(), 2), "service_cpu_ms_per_call": round(svc_cpu * 1000, 2),
                   "loadavg_after": Path("/proc/loadavg").read_text().strip()})
    short = {k: v for k, v in report.items() if k not in ("slowest_rows", "rows")}
    print(json.dumps(short, indent=1), flush=True)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
