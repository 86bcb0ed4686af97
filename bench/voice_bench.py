"""VoiceService benchmark: Verify latency, throughput and CPU for 3 s clips through gRPC on loopback.

    .venv/bin/python -m bench.voice_bench [--arms batchers defaults] [--concurrency 4] [--duration 40]
        [--max-requests 400] [--open-loop 0.8] [--raw-seconds 20] [--write-results]

Per arm (a named set of voice settings, ARMS) it starts a real `biogate serve voice` process
(default models, a temporary data dir), enrols the fixture speakers, then drives Verify with a
bounded, self-stopping async load generator (grpc.aio; stops at --duration or --max-requests
answered calls, whichever comes first; refusals, RESOURCE_EXHAUSTED, are counted apart): tenant "bench" with every layer, tenant "bench-nosynth" without AASIST,
each closed loop at --concurrency and then open loop at --open-loop x that throughput (issue 13's
p99/p50). Each level records what the load of other jobs cannot inflate: the service's CPU time per
verification, its core utilisation and its runnable threads (/proc, bench.harness.ThreadSampler).
In the same run it measures the raw models' thread CPU time on the same clips (decode + VAD, ECAPA
with Fbank, AASIST window, replay fingerprint; batch 1, one thread), their rate on one thread per
core (the ceiling), and a naive per-request baseline (SpeechBrain's EncoderClassifier on torch, one
clip per call, no service), and reads each service's peak RSS (VmHWM). --write-results replaces
the Voice section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import statistics
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from bench.harness import FIXTURES as ALL_FIXTURES
from bench.harness import (RESULTS, ROOT, ServiceProcess, ThreadSampler, child_pids, command_line, parallel_rate, pct,
                           replace_section)
from bench.loadgen import RequestBudget, run_open_loop
from services.common.config import usable_cores
from services.settings import load_config

FIXTURES = ALL_FIXTURES / "voice" / "verification"
CLIP_S = 3.0


def crop(x: np.ndarray, seconds: float = CLIP_S) -> np.ndarray:
    n = int(seconds * 16000)
    return x[max(0, (len(x) - n) // 2) :][:n]


def start_service(tmp: Path, prefix: str, workers: int = 1, voice: dict | None = None) -> ServiceProcess:
    """A voice service under ``tmp`` (config.yaml, data/) whose replay keys carry ``prefix``;
    ``voice``: settings of the voice section over the defaults."""
    # text-independent speech: the bench tenants verify without the digit challenge
    svc = ServiceProcess("voice", {"server": {"workers": workers}, "voice": {**(voice or {}), "replay_key_prefix": prefix,
                                                                           "tenants": {
        "bench": {"require_challenge": False},
        "bench-nosynth": {"synthetic_speech_check": False, "require_challenge": False}}}}, data_dir=tmp).start()
    assert svc.proc is not None
    return svc


def verify_request(tenant: str, subjects: list[str], probes: list[list[bytes]], k: int):
    """The k-th request of a level: subjects in turn, each with its probes in turn."""
    from services.common.api.v1 import common_pb2, voice_pb2

    s = k % len(subjects)
    return voice_pb2.VerifyVoiceRequest(
        subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=subjects[s]),
        audio=common_pb2.Audio(data=probes[s][(k // len(subjects)) % len(probes[s])],
                               format=common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_LINEAR16,
                                                             sample_rate_hz=16000)),
        channel=voice_pb2.VOICE_CHANNEL_WIDEBAND)


async def load(target: str, token: str, tenant: str, subjects: list[str], probes: list[list[bytes]],
               concurrency: int, duration_s: float, max_requests: int, rate: float | None = None,
               send=None) -> dict:
    """Closed loop (``rate`` None): ``concurrency`` clients, each sending its next request when the
    last is answered. Open loop: :func:`bench.loadgen.run_open_loop`, requests started at fixed
    intervals of ``rate`` per second whatever is still outstanding, so that queueing shows in the
    latencies (issue 13's p99/p50 at 80 % of the closed loop's throughput, as face_bench measures
    it); ``concurrency`` then only sets the connections. ``send(stub, k, metadata, timeout)``: the
    k-th request's calls instead of a Verify of :func:`verify_request` (awaitable; -> the Verify reply)."""
    import grpc

    from services.common.api.v1 import voice_pb2_grpc

    latencies: list[float] = []
    errors: dict[str, int] = {}  # answered with another status, by code
    budget = RequestBudget(max_requests, duration_s)  # closed loop: answered calls
    refused = budget.refused  # RESOURCE_EXHAUSTED, by reason: not requests
    matches = 0
    # A connection per client: with server.workers > 1 the kernel spreads connections, not calls.
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(concurrency)]
    stubs = [voice_pb2_grpc.VoiceServiceStub(c) for c in channels]
    meta = (("authorization", f"Bearer {token}"),)

    async def timed(k: int, timeout: float) -> None:
        nonlocal matches
        t = time.perf_counter()
        stub = stubs[k % len(stubs)]
        reply = await (send(stub, k, meta, timeout) if send else
                       stub.Verify(verify_request(tenant, subjects, probes, k), metadata=meta, timeout=timeout))
        matches += reply.match
        latencies.append(time.perf_counter() - t)

    async def client(sent: Iterator[int]) -> None:
        while budget.take():
            try:
                await timed(next(sent), 60)
            except grpc.aio.AioRpcError as err:
                if budget.done(err):
                    await budget.back_off(err)
                else:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                continue
            budget.done()

    async def open_loop(per_s: float) -> None:
        result = await run_open_loop(timed, rate_per_s=per_s, duration_s=duration_s, deadline_s=60,
                                     max_requests=max_requests)
        for o in result.outcomes:
            if o.code == "RESOURCE_EXHAUSTED":
                refused[o.reason or o.code] += 1
            elif o.code != "OK":
                errors[o.code] = errors.get(o.code, 0) + 1

    try:
        t0 = time.perf_counter()
        if rate is None:
            sent = itertools.count()
            await asyncio.gather(*(client(sent) for _ in range(concurrency)))
        else:
            await open_loop(rate)
        wall = time.perf_counter() - t0
    finally:
        for channel in channels:
            await channel.close()
    return {"tenant": tenant, "concurrency": concurrency, "offered_rps": rate, "requests": len(latencies),
            "errors": errors, "refused": dict(refused), "wall_s": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 3),
            "p50_ms": round(pct(latencies, 50), 1), "p95_ms": round(pct(latencies, 95), 1),
            "p99_ms": round(pct(latencies, 99), 1),
            "mean_ms": round(1000 * float(np.mean(latencies)), 1) if latencies else float("nan"),
            "matches": matches}


def measured_level(svc: ServiceProcess, *args, **kwargs) -> dict:
    """:func:`load` with what load cannot inflate: the service's CPU seconds per verification, its
    core utilisation (CPU seconds / (wall x cores)) and its runnable threads, sampled from /proc."""
    pids = [svc.proc.pid, *child_pids(svc.proc.pid)] if svc.proc is not None else []
    cpu0 = svc.cpu_seconds()
    sampler = ThreadSampler(pids).start()
    run = asyncio.run(load(*args, **kwargs))
    sampler.stop()
    cpu = svc.cpu_seconds() - cpu0
    done = run["requests"] + sum(run["errors"].values()) + sum(run["refused"].values())
    cores = usable_cores()
    run.update({"service_cpu_ms": round(1000 * cpu / max(1, done), 1),
                "utilisation": round(cpu / (run["wall_s"] * cores), 3), "cores": cores, **sampler.summary(cores)})
    return run


class RawModels:
    """The service's models alone, in this process, on the probes' bytes: decode + VAD, ECAPA with
    its Fbank, AASIST on the wideband window, the replay fingerprint; batch 1, torch and ONNX Runtime
    at one intra-op thread (the service's CPU defaults)."""

    STAGES: tuple[str, ...] = ("decode_vad", "ecapa", "aasist", "fingerprint")

    def __init__(self, probes: list[bytes]) -> None:
        from services.common.models import ModelStore
        from services.voice.aasist import AasistDetector
        from services.voice.antispoof import SyntheticSpeechDetector
        from services.voice.evaluation import pipeline_from_settings
        from services.voice.ingest import AudioFormat, Encoding

        settings = load_config(None, models={"cache_dir": str(ROOT / "var" / "models")})
        self.pipe = pipeline_from_settings(settings, providers=("CPUExecutionProvider",))
        store = ModelStore(settings)
        self.det = SyntheticSpeechDetector(AasistDetector(store.path("aasist", "AASIST.pth"),
                                                          store.path("aasist", "AASIST_config.json"), max_windows=1),
                                           settings.voice.antispoof_window_s)
        self.probes, self.fmt = probes, AudioFormat(Encoding.LINEAR16, 16000)
        self.verify(probes[0], None)  # lazy initialisation out of the figures

    def verify(self, data: bytes, cpu: dict[str, list[float]] | None, aasist: bool = True):
        from services.voice import replay

        def timed(stage: str, fn):
            c = time.thread_time()
            out = fn()
            if cpu is not None:
                cpu[stage].append(time.thread_time() - c)
            return out

        prepared = timed("decode_vad", lambda: self.pipe.prepare(data, self.fmt))
        timed("ecapa", lambda: self.pipe.embed([prepared]))
        if aasist:
            timed("aasist", lambda: self.det.score_windows([self.det.window_of(prepared)]))
        timed("fingerprint", lambda: replay.fingerprint(prepared.samples))
        return prepared

    def cpu_ms(self, n: int) -> dict[str, float]:
        """Median thread CPU milliseconds per stage over ``n`` probes, one after another."""
        cpu: dict[str, list[float]] = {k: [] for k in self.STAGES}
        for k in range(n):
            self.verify(self.probes[k % len(self.probes)], cpu)
        return {k: round(1000 * statistics.median(v), 1) for k, v in cpu.items()}

    def parallel_rate(self, seconds: float, aasist: bool = True) -> float:
        """Verifications' worth of raw model runs per second, one thread per usable core: the
        ceiling of issue 13, measured after the levels under the machine's load of the moment."""
        return parallel_rate(lambda k: self.verify(self.probes[k % len(self.probes)], None, aasist), seconds,
                             usable_cores())


def naive_baseline(clips: list[np.ndarray], n: int) -> dict:
    """Per request: SpeechBrain EncoderClassifier on torch (the library's own call), no batching."""
    from services.common.models import ModelStore
    from services.voice.ecapa import EcapaSpeechBrain

    settings = load_config(None, models={"cache_dir": str(ROOT / "var" / "models")})
    sb = EcapaSpeechBrain(ModelStore(settings).path("ecapa-voxceleb").parent)
    template = sb.embed(clips[0])
    sb.embed(clips[0])
    t = time.perf_counter()
    for x in clips[:n]:
        e = sb.embed(x)
        float(np.dot(template, e) / (np.linalg.norm(template) * np.linalg.norm(e)))
    return {"speechbrain_per_request_ms": round(1000 * (time.perf_counter() - t) / n, 1), "clips": n}


def write_results(report: dict, path: Path = RESULTS) -> None:
    r, raw = report, report["raw_cpu_ms"]
    naive = r.get("naive", {}).get("speechbrain_per_request_ms", float("nan"))
    rss = ", ".join(f"{arm} {mb} MB" for arm, mb in r["peak_rss_mb"].items())
    parallel = ", ".join(f"{'every layer' if t == 'bench' else 'without AASIST'} {v:g}/s"
                         for t, v in r.get("raw_parallel_rps", {}).items()) or "not run"
    section = f"""## Voice

(written by `bench/voice_bench.py`; {r['date']}, {r['machine']}, {r['load_end']} at the end; `{r['command']}`)

Verify of 3 s clips (16 kHz LINEAR16, middle 3 s of the fixture recordings; each request a
different clip of an enrolled speaker) through gRPC on loopback against a `biogate serve voice`
process with the default models and SQLite storage, one service per arm (its voice settings), in
this order. Load: a bounded, self-stopping grpc.aio generator, closed loop at a fixed concurrency,
then open loop (arrivals at fixed intervals) at a fraction of the closed loop's throughput. Service CPU = its
process's user + system time over the level / verifications; raw CPU = the same work by the
models alone in this process, thread CPU time, batch 1, one intra-op thread, same clips (decode +
VAD {raw['decode_vad']} ms, ECAPA with Fbank {raw['ecapa']} ms, AASIST window {raw['aasist']} ms,
fingerprint {raw['fingerprint']} ms); utilisation = service CPU s / (wall x cores); runnable
threads: the service's threads in state R, sampled every 50 ms; demand = mean of min(runnable,
cores) / cores; of CPU ceiling = verifications/s x raw CPU s / cores; of parallel raw =
verifications/s / the raw models' rate on one thread per core afterwards
({parallel}).

{table(report)}

Naive baseline (same run, same clips): SpeechBrain's EncoderClassifier on torch, one call per
request, no service: {naive} ms per verification (embedding only).
Peak RSS of the voice service process (VmHWM, default models, after the load): {rss}.

No GPU machine was lent to this task. Design for >= 2,000 verifications/s per H100: the ECAPA
ONNX graph takes batches ([N, T, 80] with relative lengths; `voice.max_pad_ratio` > 0 pads unequal
clips into one batch) and the service micro-batches across concurrent requests where a model runs
on an accelerator (`voice.micro_batching` "auto", `voice.batch_max`, `voice.batch_wait_ms`), so
onnxruntime-gpu runs one batch per few ms (raw ECAPA does ~4,900 clips/s batched on an H100). The
CPU-side work per request (decode, soxr, Silero VAD windows, Fbank, fingerprint: ~{raw['decode_vad'] + raw['fingerprint']:.0f} ms
of CPU here) must then be spread over processes (`server.workers`) or moved to the GPU too;
AASIST, batched per window (fixed length), is the heaviest model and needs the GPU most.
Repeated probes (each clip is sent several times) are refused by the replay cache after their
first acceptance: the work per request is the same, hence fewer matches than requests.
"""
    replace_section("Voice", section, keep_subsections=True, path=path)  # the accuracy and layer subsections stay


# Named sets of voice settings a run compares in the same invocation (--arms); "defaults" is this
# checkout's VoiceConfig.
ARMS: dict[str, dict] = {"defaults": {}, "batchers": {"micro_batching": "on"}}


def serve_arm(args, arm: str, audio: dict[str, list[np.ndarray]]) -> tuple[list[dict], float]:
    """One voice service with the settings of ``arm``: enrol, then each level; (levels, peak RSS MB)."""
    import grpc

    from services.common.api.v1 import common_pb2, voice_pb2, voice_pb2_grpc
    from services.common.client import connect
    from services.common.storage import ConsentRecord, open_storage

    prefix = f"biogate-bench:{uuid.uuid4().hex[:8]}"
    levels: list[dict] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        svc = start_service(tmp, prefix, args.workers, ARMS[arm])
        try:
            settings = load_config(tmp / "config.yaml")
            token = json.loads(settings.dev_credentials_file.read_text())["dev-all"]
            storage = open_storage(settings.storage_dsn, settings.storage)
            stub = voice_pb2_grpc.VoiceServiceStub(connect(svc.address, token))
            subjects, probes = [], []
            for tenant in ("bench", "bench-nosynth"):
                for name, xs in audio.items():
                    subject = f"bench-{name.replace('_', '-')}"
                    storage.subjects.record_consent(ConsentRecord(tenant, subject, "biometric_verification",
                                                                  ("voice",), "bench", "bench"))
                    try:
                        stub.Enroll(voice_pb2.EnrollVoiceRequest(
                            subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject),
                            utterances=[common_pb2.Audio(data=sf_bytes(x)) for x in xs[:2]], replace=True), timeout=120)
                    except grpc.RpcError as err:
                        print(f"enrolment of {name} refused: {err.details()}", file=sys.stderr)
                        continue
                    if tenant == "bench":
                        subjects.append(subject)
                        probes.append([pcm16(crop(x)) for x in xs[2:]])
            for tenant in args.tenants:
                run = measured_level(svc, svc.address, token, tenant, subjects, probes, args.concurrency,
                                     args.duration, args.max_requests)
                levels.append({"arm": arm, "loop": "closed", **run})
                print(json.dumps(levels[-1]), flush=True)
                if args.open_loop > 0 and run["throughput_rps"] > 0:
                    rate = args.open_loop * run["throughput_rps"]
                    run = measured_level(svc, svc.address, token, tenant, subjects, probes, args.concurrency,
                                         args.duration, args.max_requests, rate=rate)
                    levels.append({"arm": arm, "loop": f"open, {args.open_loop:.0%} of closed", **run})
                    print(json.dumps(levels[-1]), flush=True)
            rss = svc.peak_rss_mb()
        finally:
            svc.stop()
            drop_replay_keys(svc, prefix)
    return levels, rss


def drop_replay_keys(svc: ServiceProcess, prefix: str) -> None:
    """The bench service's replay fingerprints out of Redis."""
    import redis

    client = redis.Redis.from_url(svc.config.get("voice", {}).get("replay_store", "redis://127.0.0.1:6379/0"))
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--max-requests", type=int, default=400,
                    help="per level: a closed loop stops at this many answered calls (refusals counted apart), "
                         "an open loop at this many issued")
    ap.add_argument("--raw-clips", type=int, default=24, help="probes timed by the raw models, one after another")
    ap.add_argument("--raw-seconds", type=float, default=20.0,
                    help="the raw models on one thread per core for this long (the ceiling); 0: not run")
    ap.add_argument("--open-loop", type=float, default=0.8,
                    help="after each closed-loop level, an open-loop one at this fraction of its throughput; 0: none")
    ap.add_argument("--tenants", nargs="+", choices=("bench", "bench-nosynth"), default=["bench", "bench-nosynth"],
                    help="bench: every layer; bench-nosynth: without AASIST")
    ap.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["defaults"],
                    help="voice settings to compare, one service each, in this order")
    ap.add_argument("--workers", type=int, default=1, help="server.workers of the service")
    ap.add_argument("--skip-naive", action="store_true", help="no SpeechBrain per-request baseline")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()

    speakers = sorted(p for p in FIXTURES.iterdir() if p.is_dir())
    # Longest recordings first: the two longest enrol, the others (cropped to 3 s) are the probes.
    audio = {s.name: [sf.read(f, dtype="float32")[0] for f in sorted(s.glob("*.wav"), key=lambda p: -p.stat().st_size)]
             for s in speakers}
    clips = [crop(x) for xs in audio.values() for x in xs[2:]]
    report: dict = {"date": dt.date.today().isoformat(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), load average "
                               f"{os.getloadavg()[0]:.1f}",
                    "command": command_line(), "workers": args.workers, "runs": [], "peak_rss_mb": {}}
    for arm in args.arms:
        levels, rss = serve_arm(args, arm, audio)
        report["runs"] += levels
        report["peak_rss_mb"][arm] = round(rss)
    raw = RawModels([pcm16(x) for x in clips])
    raw_cpu = raw.cpu_ms(args.raw_clips)
    report["raw_cpu_ms"] = raw_cpu
    per_tenant = {"bench": sum(raw_cpu.values()), "bench-nosynth": sum(raw_cpu.values()) - raw_cpu["aasist"]}
    if args.raw_seconds > 0:
        report["raw_parallel_rps"] = {t: round(raw.parallel_rate(args.raw_seconds, t == "bench"), 3)
                                      for t in args.tenants}
    for run in report["runs"]:
        raw_ms = per_tenant[run["tenant"]]
        # of the CPU ceiling = cores / raw CPU per verification: what the service would sustain if
        # its cores were its own; = utilisation x raw CPU / service CPU.
        run["raw_cpu_ms"] = round(raw_ms, 1)
        run["raw_over_service_cpu"] = round(raw_ms / run["service_cpu_ms"], 3) if run["service_cpu_ms"] else None
        run["of_cpu_ceiling"] = round(run["throughput_rps"] * raw_ms / 1000 / run["cores"], 3)
        if "raw_parallel_rps" in report:
            run["of_parallel_raw"] = round(run["throughput_rps"] / report["raw_parallel_rps"][run["tenant"]], 3)
    report["load_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps({k: report[k] for k in ("raw_cpu_ms", "peak_rss_mb", "load_end")}
                     | {"raw_parallel_rps": report.get("raw_parallel_rps")}), flush=True)
    print(table(report), flush=True)
    if not args.skip_naive:
        report["naive"] = naive_baseline(clips, args.raw_clips)
        print(json.dumps(report["naive"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.write_results:
        write_results(report)
    return 0


def table(report: dict) -> str:
    """The levels as a RESULTS.md table."""
    rows = ["| arm | layers | loop | requests | verifications/s | p50 ms | p95 ms | p99 ms | p99 / p50 | service CPU ms "
            "/ verification | raw CPU / service CPU | utilisation | runnable threads (mean / p95) | demand | of CPU "
            "ceiling | demand x raw/service CPU | of parallel raw |", "|" + "---|" * 17]
    for r in report["runs"]:
        layers = "every layer" if r["tenant"] == "bench" else "without AASIST"
        rows.append(f"| {r['arm']} | {layers} | {r['loop']} | {r['requests']} | {r['throughput_rps']:.2f} | "
                    f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['p99_ms'] / r['p50_ms']:.2f} | "
                    f"{r['service_cpu_ms']:.0f} | {r['raw_over_service_cpu']:.0%} | {r['utilisation']:.0%} | "
                    f"{r['runnable_mean']:.1f} / {r['runnable_p95']:.0f} | {r['demand']:.0%} | {r['of_cpu_ceiling']:.0%} | "
                    f"{r['demand'] * r['raw_over_service_cpu']:.0%} | "
                    f"{r.get('of_parallel_raw', float('nan')):.0%} |")
    return "\n".join(rows)


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def sf_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
