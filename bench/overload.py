"""Overload: face Verify and voice Verify at 1x and 4x their sustained rate on this machine (issue 12).

    .venv/bin/python -m bench.overload [--services face voice] [--factor 4] [--base-s 30] [--over-s 30]
        [--face-deadline-s 5] [--voice-deadline-s 10] [--compare-without] [--write-results] [--out FILE]

Each service runs in its own process (bench/harness.py: `biogate serve`, default configuration,
so admission control as shipped). After a warm-up:

1x   a closed loop of admission.concurrency + max_queue clients for --base-s (every slot busy, the
     queue never empty, nothing refused): the sustained rate R (calls answered per second) and its
     latencies;
4x   an open loop issuing --factor x R calls per second for --over-s, each with the service's
     deadline (face 5 s, as the issue's run; voice 10 s: one voice Verify costs ~1 s of raw CPU,
     AASIST most of it, and takes 2.5-5 s here under the other jobs' load), whatever the answers:
     calls passed within their deadline per second (as % of R),
     p50/p99 of the passes, p99 of the refusals (RESOURCE_EXHAUSTED, each with its retry hint);
     meanwhile GetEnrollment and a health check every 0.25 s, which must not starve;
memory VmRSS before the runs, the highest VmRSS sampled during the 4x run, and VmRSS after 10 s idle.

--compare-without repeats each service's runs with admission control off: what the issue measured.

The machine's cores are shared with other work: the load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
import numpy as np

from bench.harness import FIXTURES, ServiceProcess, command_line, machine, machine_line, replace_section, write_json
from bench.loadgen import aio_channel, run_load, run_open_loop
from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, voice_pb2, voice_pb2_grpc
from services.common.storage.interfaces import Modality

TENANT = "bench"
IDLE_AFTER_S = 10.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """The highest VmRSS of a process seen while running (sampled every 0.1 s on a thread)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> "RssSampler":
        self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def _consent(svc: ServiceProcess, subjects: list[str], modality: Modality) -> None:
    from services.common.storage import ConsentRecord, open_storage

    settings = svc.settings
    storage = open_storage(settings.storage_dsn, settings.storage)
    try:
        for s in subjects:
            storage.subjects.record_consent(ConsentRecord(TENANT, s, "biometric_verification", (modality,), "v1"))
    finally:
        storage.close()


# --- workloads: enrol, then the call driven at load and the cheap call that must not starve ---

Call = Callable[[Any, int, float], Awaitable[object]]  # (stub, request number, timeout) -> awaitable


def _calls(requests: list, subject: str) -> tuple[Call, Call]:
    """Verify with the requests in turn, and GetEnrollment of ``subject`` (the cheap call)."""
    cheap = common_pb2.GetEnrollmentRequest(subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=subject))

    async def verify(stub, i: int, timeout: float):
        return await stub.Verify(requests[i % len(requests)], timeout=timeout)

    async def get_enrollment(stub, i: int, timeout: float):
        return await stub.GetEnrollment(cheap, timeout=timeout)

    return verify, get_enrollment


def face_workload(svc: ServiceProcess, subjects: int = 6) -> tuple[Any, Call, Call]:
    """Enrols the first ``subjects`` people of trials_face.csv; Verify sends their genuine probes."""
    with open(FIXTURES / "trials_face.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["target"] == "1"]
    chosen: dict[str, list[str]] = {}
    for r in rows:
        if r["enroll"] in chosen or len(chosen) < subjects:
            chosen.setdefault(r["enroll"], []).append(r["probe"])
    names = [f"s{i}" for i in range(len(chosen))]
    _consent(svc, names, "face")
    with svc.channel() as channel:
        stub = face_pb2_grpc.FaceServiceStub(channel)
        for name, enrol in zip(names, chosen, strict=True):
            stub.Enroll(face_pb2.EnrollFaceRequest(subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=name),
                                                   images=[common_pb2.Image(data=(FIXTURES / enrol).read_bytes())]),
                        timeout=120)
    requests = [face_pb2.VerifyFaceRequest(subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=name),
                                           image=common_pb2.Image(data=(FIXTURES / p).read_bytes()))
                for name, probes in zip(names, chosen.values(), strict=True) for p in probes]
    return (face_pb2_grpc.FaceServiceStub, *_calls(requests, names[0]))


def face_config() -> dict:
    return {}


def voice_config() -> dict:
    # text-independent speech: verification without the digit challenge; the replay store in memory
    return {"voice": {"replay_store": "memory", "tenants": {TENANT: {"require_challenge": False}}}}


def voice_workload(svc: ServiceProcess, speakers: int = 4) -> tuple[Any, Call, Call]:
    """Enrols ``speakers`` fixture speakers on their two longest recordings; Verify sends 3 s of the others."""
    import soundfile as sf

    from bench.voice_bench import crop, sf_bytes

    root = FIXTURES / "voice" / "verification"
    dirs = sorted(p for p in root.iterdir() if p.is_dir())[:speakers]
    names = [f"v-{d.name.replace('_', '-')}" for d in dirs]
    _consent(svc, names, "voice")

    requests = []
    with svc.channel() as channel:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        for name, d in zip(names, dirs, strict=True):
            audio = [sf.read(f, dtype="float32")[0] for f in sorted(d.glob("*.wav"), key=lambda p: -p.stat().st_size)]
            subject = common_pb2.SubjectRef(tenant_id=TENANT, subject_id=name)
            stub.Enroll(voice_pb2.EnrollVoiceRequest(subject=subject, utterances=[common_pb2.Audio(data=sf_bytes(x))
                                                                                  for x in audio[:2]]), timeout=120)
            requests += [voice_pb2.VerifyVoiceRequest(subject=subject, audio=common_pb2.Audio(data=sf_bytes(crop(x))),
                                                      channel=voice_pb2.VOICE_CHANNEL_WIDEBAND) for x in audio[2:]]
    return (voice_pb2_grpc.VoiceServiceStub, *_calls(requests, names[0]))


WORKLOADS = {"face": (face_config, face_workload), "voice": (voice_config, voice_workload)}


# --- the run ---------------------------------------------------------------------------------

async def _cheap_probes(svc: ServiceProcess, stub, cheap: Call, stop: asyncio.Event, timeout_s: float) -> dict:
    """GetEnrollment and a health check every 0.25 s until ``stop``: their latencies and failures."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    lat: dict[str, list[float]] = {"GetEnrollment": [], "Health": []}
    failed: dict[str, int] = {"GetEnrollment": 0, "Health": 0}
    async with grpc.aio.insecure_channel(svc.address) as plain:
        health: Any = health_pb2_grpc.HealthStub(plain)  # its stubs declare none of its methods
        i = 0
        while not stop.is_set():
            for name, call in (("GetEnrollment", lambda i=i: cheap(stub, i, timeout_s)),
                               ("Health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s))):
                t = time.perf_counter()
                try:
                    await call()
                    lat[name].append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    failed[name] += 1
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
    return {name: {"ok": len(v), "failed": failed[name],
                   "p99_ms": round(float(np.percentile(np.asarray(v) * 1000, 99)), 1) if v else float("nan")}
            for name, v in lat.items()}


def overload(svc: ServiceProcess, stub_class, verify: Call, cheap: Call, *, factor: float, base_s: float,
             over_s: float, deadline_s: float, warm_s: float = 3.0, idle_after_s: float = IDLE_AFTER_S,
             max_requests: int = 20000) -> dict:
    """The 1x closed-loop run, then the ``factor`` x open-loop run with deadlines, on one service."""
    slots = svc.settings.server.admission.slots
    pid = svc.proc.pid  # type: ignore[union-attr]

    async def run() -> dict:
        channel = aio_channel(svc.address, svc.token())
        stub = stub_class(channel)
        k = slots + svc.settings.server.admission.max_queue  # every slot busy, the queue never empty, none refused
        await run_load(lambda: verify(stub, 0, 60.0), concurrency=k, duration_s=warm_s, max_requests=max_requests)
        rss_before = rss_mb(pid)
        counter = iter(range(10**9))
        base = await run_load(lambda: verify(stub, next(counter), 60.0), concurrency=k, duration_s=base_s,
                              max_requests=max_requests)
        rate = base.throughput
        stop = asyncio.Event()
        with RssSampler(pid) as rss:
            probes = asyncio.create_task(_cheap_probes(svc, stub, cheap, stop, deadline_s))
            over = await run_open_loop(lambda i, t: verify(stub, i, t), rate_per_s=factor * rate, duration_s=over_s,
                                       deadline_s=deadline_s, max_requests=max_requests)
            stop.set()
            cheap_calls = await probes
        await channel.close()
        await asyncio.sleep(idle_after_s)
        o = over.as_dict()
        return {
            "slots": slots, "max_queue": svc.settings.server.admission.max_queue,
            "base": {**base.as_dict(), "rate_per_s": round(rate, 2)},
            "over": o, "factor": factor, "outcomes": over.outcomes,
            "passed_pct_of_1x": round(100 * over.passed_rate() / rate, 1) if rate else float("nan"),
            "refused_answered_in_pct_of_deadline_p99": round(o["refused_p99_ms"] / (deadline_s * 10), 2),
            "cheap": cheap_calls,
            "rss_mb": {"before": round(rss_before, 1), "during_peak": round(rss.peak, 1),
                       "after_idle": round(rss_mb(pid), 1)},
        }

    return asyncio.run(run())


def run_service(name: str, args, admission: bool = True) -> dict:
    make_config, workload = WORKLOADS[name]
    config = make_config()
    if not admission:
        config["server"] = {"admission": {"enabled": False}}
    with ServiceProcess(name, config) as svc:
        stub_class, verify, cheap = workload(svc)
        result = overload(svc, stub_class, verify, cheap, factor=args.factor, base_s=args.base_s,
                          over_s=args.over_s, deadline_s=getattr(args, f"{name}_deadline_s"))
    result["service"] = name
    result["admission"] = admission
    result["deadline_s"] = getattr(args, f"{name}_deadline_s")
    return result


def write_results(report: dict) -> None:
    lines = [
        "## Overload (issue 12)",
        "",
        f"`{report['command']}`: {machine_line(report['machine'])}. Each service in its own process with the shipped "
        "admission control (server.admission: concurrency = cores, max_queue 8). 1x: a closed loop of "
        "concurrency + max_queue clients (slots always busy, nothing refused), its throughput is the sustained rate R. "
        f"{report['factor']:g}x: an open loop issuing {report['factor']:g} x R calls/s for {report['over_s']:g} s, "
        "each with the deadline in the table; GetEnrollment and a health check every 0.25 s meanwhile. "
        "Memory: VmRSS before the runs, the highest VmRSS sampled during the overload, VmRSS after "
        f"{IDLE_AFTER_S:g} s idle.",
        "",
        "| service | deadline s | R (1x, /s) | 1x p50 / p99 ms | offered (/s) | passed in deadline (/s, % of R) | passes p50 / p99 ms "
        "| refused (RESOURCE_EXHAUSTED) | refusals p50 / p99 ms | other codes | GetEnrollment / health p99 ms "
        "| RSS before / during / after MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        b, o, c, m = r["base"], r["over"], r["cheap"], r["rss_mb"]
        other = {k: v for k, v in o["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
        reasons = ", ".join(f"{k or 'no reason'} {v}" for k, v in o["reasons"].items())
        lines.append(
            f"| {r['service']} Verify{'' if r['admission'] else ' (admission off)'} | {r['deadline_s']:g} "
            f"| {b['rate_per_s']:.1f} | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} "
            f"| {o['offered_per_s']:.1f} | {o['passed_per_s']:.1f} ({r['passed_pct_of_1x']:.0f} %) "
            f"| {o['passed_p50_ms']:.0f} / {o['passed_p99_ms']:.0f} "
            f"| {o['codes'].get('RESOURCE_EXHAUSTED', 0)} of {o['issued']} ({reasons or '-'}; "
            f"{o['refused_with_retry_hint']} with a retry hint) "
            f"| {o['refused_p50_ms']:.0f} / {o['refused_p99_ms']:.0f} | {json.dumps(other) if other else '-'} "
            f"| {c['GetEnrollment']['p99_ms']:.0f} / {c['Health']['p99_ms']:.0f} "
            f"| {m['before']:.0f} / {m['during_peak']:.0f} / {m['after_idle']:.0f} |")
    lines += ["", report.get("notes", "")]
    replace_section("Overload (issue 12)", "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", nargs="+", choices=sorted(WORKLOADS), default=["face", "voice"])
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--base-s", type=float, default=30.0)
    ap.add_argument("--over-s", type=float, default=30.0)
    ap.add_argument("--face-deadline-s", type=float, default=5.0)
    ap.add_argument("--voice-deadline-s", type=float, default=10.0)
    ap.add_argument("--compare-without", action="store_true",
                    help="also run each service with admission control off (server.admission.enabled: false)")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()
    report: dict = {"command": command_line(), "machine": machine(), "factor": args.factor, "over_s": args.over_s,
                    "runs": []}
    for name in args.services:
        for admission in (True, False) if args.compare_without else (True,):
            result = run_service(name, args, admission)
            result.pop("outcomes")
            print(json.dumps(result), flush=True)
            report["runs"].append(result)
    report["machine_after"] = machine()
    write_json(args.out, report)
    if args.write_results:
        write_results(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
