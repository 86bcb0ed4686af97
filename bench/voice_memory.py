"""Voice service memory against the calls it admits at a time (issue 13: <= 2 GB RSS per process).

    .venv/bin/python -m bench.voice_memory [--concurrency 2 4 8 16] [--rounds 2] [--limit default 2]
        [--env KEY=VALUE ...] [--write-results]

For each admitted-call count N and each ``voice.max_inline_model_runs`` (``--limit``; "default":
unset, i.e. min(4, N)) it starts a real `biogate serve voice` process (CPU defaults, one
process) with ``server.admission.concurrency: N``, so that N calls run the models at once as on an
N-core machine (the CPU time of this machine is shared between them: only memory is measured). It
enrols the fixture speakers, then sends ``--rounds`` bursts of N concurrent Verifies with every layer
(3 s clips, tenant "bench" without the digit challenge, as bench/voice_bench.py; with ``--challenge``
each with one, which the clips fail, so that the Whisper digit recognisers run too). Meanwhile it reads
the service's metrics every 20 ms: the most AASIST runs and model runs (ECAPA + AASIST) under way at
once (``biogate_model_runs_in_flight``), the most calls waiting for the bound
(``biogate_model_runs_waiting``); at the end the process's peak RSS (VmHWM), and its RSS once
idle for ``server.admission.trim_memory_idle_s`` + 3 s (after the idle malloc_trim). ``--env``: more
of the service's environment. MALLOC_ARENA_MAX does not change it: the voice process sets glibc's
arena cap to 2 itself (services/voice/server.py), on a 16-core machine as here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import asyncio
import json
import os
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from bench.harness import ServiceProcess, free_port, command_line, machine_line, replace_section
from bench.voice_bench import FIXTURES, crop, pcm16, sf_bytes, verify_request

HEADING = "Voice memory against admitted calls"


class MemoryService(ServiceProcess):
    def __init__(self, *args, env: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env = env or {}

    def environment(self) -> dict[str, str] | None:
        return {**os.environ, **self.env} if self.env else None


class MetricsSampler:
    """The most of each watched gauge seen at once, read from the service's /metrics every 20 ms."""

    WATCHED = {"aasist": 'biogate_model_runs_in_flight{model="voice-aasist"}',
               "ecapa": 'biogate_model_runs_in_flight{model="voice-ecapa"}',
               "waiting": 'biogate_model_runs_waiting{limit="voice"}'}

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.most = {k: 0.0 for k in (*self.WATCHED, "models")}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.url, timeout=2).read().decode()
        values = {k: 0.0 for k in self.WATCHED}
        for line in text.splitlines():
            for k, name in self.WATCHED.items():
                if line.startswith(name + " "):
                    values[k] = float(line.split()[-1])
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self._read()
            for k, x in v.items():
                self.most[k] = max(self.most[k], x)
            self.most["models"] = max(self.most["models"], v["aasist"] + v["ecapa"])
            self._stop.wait(0.02)

    def __enter__(self) -> "MetricsSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def burst(target: str, token: str, subjects: list[str], probes: list[list[bytes]], n: int, first: int,
                nonce=None) -> dict:
    import grpc

    from services.common.api.v1 import voice_pb2_grpc

    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]
    meta = (("authorization", f"Bearer {token}"),)
    out: dict = {"ok": 0, "matches": 0, "errors": {}}

    async def one(k: int) -> None:
        try:
            request = verify_request("bench", subjects, probes, k)
            if nonce is not None:
                request.challenge_nonce = nonce(request.subject.subject_id)
            reply = await voice_pb2_grpc.VoiceServiceStub(channels[k - first]).Verify(request, metadata=meta,
                                                                                      timeout=300)
            out["ok"] += 1
            out["matches"] += reply.match
        except grpc.aio.AioRpcError as err:
            out["errors"][err.code().name] = out["errors"].get(err.code().name, 0) + 1

    try:
        await asyncio.gather(*(one(first + i) for i in range(n)))
    finally:
        for c in channels:
            await c.close()
    return out


def measure(n: int, limit: int | None, rounds: int, env: dict[str, str], audio: dict,
            voice: dict | None = None, challenge: bool = False) -> dict:
    import grpc
    import redis

    from services.common.api.v1 import common_pb2, voice_pb2, voice_pb2_grpc
    from services.common.client import connect
    from services.common.storage import ChallengeRecord, ConsentRecord, open_storage
    from services.settings import load_config

    prefix = f"biogate-bench:{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        metrics_port = free_port()
        config = {"server": {"workers": 1, "rpc_timeout_s": 300, "voice": {"metrics_port": metrics_port},
                             "admission": {"concurrency": n, "max_queue": n}},
                  "voice": {"replay_store": "redis://127.0.0.1:6379/0", "replay_key_prefix": prefix,
                            "max_inline_model_runs": limit, **(voice or {}),
                            "tenants": {"bench": {"require_challenge": not challenge}}}}
        svc = MemoryService("voice", config, data_dir=tmp, env=env).start()
        try:
            settings = load_config(svc.config_file)
            token = json.loads(settings.dev_credentials_file.read_text())["dev-all"]
            storage = open_storage(settings.storage_dsn, settings.storage)
            stub = voice_pb2_grpc.VoiceServiceStub(connect(svc.address, token))
            subjects, probes = [], []
            for name, xs in audio.items():
                subject = f"bench-{name.replace('_', '-')}"
                storage.subjects.record_consent(ConsentRecord("bench", subject, "biometric_verification",
                                                              ("voice",), "bench", "bench"))
                try:
                    stub.Enroll(voice_pb2.EnrollVoiceRequest(
                        subject=common_pb2.SubjectRef(tenant_id="bench", subject_id=subject),
                        utterances=[common_pb2.Audio(data=sf_bytes(x)) for x in xs[:2]], replace=True), timeout=300)
                except grpc.RpcError:
                    continue
                subjects.append(subject)
                probes.append([pcm16(crop(x)) for x in xs[2:]])
            after_enrol = svc.peak_rss_mb()
            results = []
            t0 = time.perf_counter()
            def nonce(subject: str) -> str:
                """A digit challenge's nonce: the clips say other words, so it fails, but the
                recognisers run on every Verify as on a bank's."""
                return storage.challenges.create(ChallengeRecord(
                    "bench", subject, "voice_digits", {"digits": "123456"},
                    dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=600))).nonce

            with MetricsSampler(metrics_port) as sampler:
                by_round = []
                for r in range(rounds):
                    results.append(asyncio.run(burst(svc.address, token, subjects, probes, n, r * n,
                                                     nonce if challenge else None)))
                    by_round.append(round(svc.peak_rss_mb()))
            wall = time.perf_counter() - t0
            time.sleep(settings.server.admission.trim_memory_idle_s + 3.0)  # the idle trimmer's turn
            rss_idle = rss_mb(svc)
            errors: dict[str, int] = {}
            for res in results:
                for code, c in res["errors"].items():
                    errors[code] = errors.get(code, 0) + c
            return {"concurrency": n, "limit": limit, "challenge": challenge, "env": " ".join(f"{k}={v}" for k, v in env.items()),
                    "voice": voice or {}, "rounds": rounds,
                    "verifies": sum(r["ok"] for r in results), "matches": sum(r["matches"] for r in results),
                    "errors": errors, "wall_s": round(wall, 1),
                    "most_aasist": int(sampler.most["aasist"]), "most_model_runs": int(sampler.most["models"]),
                    "most_waiting": int(sampler.most["waiting"]),
                    "peak_after_enrol_mb": round(after_enrol), "peak_rss_mb": round(svc.peak_rss_mb()),
                    "peak_by_round_mb": by_round, "rss_idle_mb": round(rss_idle)}
        finally:
            svc.stop()
            client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)


def rss_mb(svc: ServiceProcess) -> float:
    assert svc.proc is not None
    for line in Path(f"/proc/{svc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def table(rows: list[dict]) -> str:
    out = ["| admitted calls N | max_inline_model_runs | service environment | Verifies (errors) | most AASIST runs at once | "
           "most model runs at once | most waiting | peak RSS after enrolment MB | peak RSS MB | RSS idle after MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errs = sum(r["errors"].values())
        out.append(f"| {r['concurrency']} | {r['limit'] or 'default'} | {r.get('env') or 'default'} | {r['verifies']} ({errs}) | "
                   f"{r['most_aasist']} | {r['most_model_runs']} | {r['most_waiting']} | {r['peak_after_enrol_mb']:,} | "
                   f"{r['peak_rss_mb']:,} | {r.get('rss_idle_mb', '-')} |")
    return "\n".join(out)


def main() -> int:
    import soundfile as sf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--limit", nargs="+", default=["default"],
                    help="voice.max_inline_model_runs values; default: unset (min(4, N)); 256: no bound")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--env", nargs="*", default=[], help="more KEY=VALUE of the service's environment")
    ap.add_argument("--voice", type=json.loads, default=None, help="voice settings over the defaults (JSON)")
    ap.add_argument("--speakers", type=int, default=8)
    ap.add_argument("--challenge", action="store_true", help="every Verify with a digit challenge (Whisper runs)")
    ap.add_argument("--json", type=Path, default=None, help="append each row to this JSON-lines file")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    audio = {}
    for d in sorted(p for p in FIXTURES.iterdir() if p.is_dir())[: args.speakers]:
        audio[d.name] = [sf.read(p, dtype="float32")[0] for p in sorted(d.glob("*.wav"))[:4]]
    rows = []
    for n in args.concurrency:
        for lim in args.limit:
            limit = None if lim == "default" else int(lim)
            env = dict(e.split("=", 1) for e in args.env)
            row = measure(n, limit, args.rounds, env, audio, args.voice, args.challenge)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))
    if args.write_results:
        replace_section(HEADING, f"## {HEADING}\n\n({machine_line()}; `{command_line()}`)\n\n{table(rows)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
