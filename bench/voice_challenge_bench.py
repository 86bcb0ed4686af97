"""VoiceService with the digit challenge on: issue 13's CPU figures on the path production runs.

    .venv/bin/python -m bench.voice_challenge_bench [--concurrency 4] [--duration 40] [--max-requests 200]
        [--open-loop 0.8] [--subjects 4] [--raw-clips 12] [--raw-seconds 20] [--out FILE]

The MFA's default policy asks for the digit challenge on the voice factor (app and IVR, issue 11),
so every production Verify also runs the digit recogniser (Whisper tiny.en, CTranslate2) and the
challenge's issue and consumption; bench/voice_bench.py's tenants verify without it. In one
invocation this runs, each against its own `biogate serve voice` process (default models):

* **without challenge**: voice_bench's arm "defaults", tenant "bench" (every layer, no challenge),
  its 3 s clips (:func:`bench.voice_bench.serve_arm`);
* **with challenge**: tenant "bench-challenge", which the service's defaults govern (challenge
  required, every layer). The two speakers of ../shared/fixtures/voice/digits are enrolled as
  bench/genuine_rates.py does (takes 0-2 of every digit, at 16 kHz for the app), each under
  ``--subjects`` subject ids (the replay cache is per subject); each request asks the service for a
  challenge (StartVoiceChallenge), answers it with the speaker's takes 3-9 of the asked digits at
  random (16 kHz LINEAR16, 0.25 s pauses, as tests/mfa/spoken_digits.py joins them, never filtered
  by what the service hears) and sends Verify with the nonce. Outcomes are counted: accepted, or the
  layer that refused.

each closed loop at ``--concurrency`` then open loop at ``--open-loop`` x its throughput, with the
service's CPU per verification (/proc). Then, in this process, the raw models on the same inputs:
batch 1, one thread, decode + VAD, ECAPA, AASIST, fingerprint and (with challenge) the digit
recogniser, on the answers the closed loop sent; their rate on one thread per core (the ceiling).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf

from bench import voice_bench
from bench.harness import command_line
from services.common.config import usable_cores
from services.settings import load_config

TENANT = "bench-challenge"  # not configured by voice_bench: the service's default policy
PAUSE_S = 0.25


class Answers:
    """The speakers' answer takes (3-9 of every digit) resampled to 16 kHz once, so that building an
    answer in the load generator costs no resampling: the asked digits in random takes, joined with
    pauses, as LINEAR16 bytes."""

    def __init__(self, seed: int) -> None:
        import soxr

        from tests.mfa import spoken_digits as sd

        self.rng = random.Random(seed)
        self.takes = {(s, d): [soxr.resample(sd.take(d, s, t), sd.RATE, 16000, quality="HQ").astype(np.float32)
                               for t in sd.ANSWER_TAKES] for s in sd.SPEAKERS for d in range(10)}
        self.pause = np.zeros(int(PAUSE_S * 16000), np.float32)

    def answer(self, speaker: str, digits: str) -> bytes:
        parts = [self.pause]
        for d in digits.replace(" ", ""):
            parts += [self.rng.choice(self.takes[(speaker, int(d))]), self.pause]
        return voice_bench.pcm16(np.concatenate(parts))


class RawWithDigits(voice_bench.RawModels):
    """voice_bench's raw models plus the service's digit recogniser (one CTranslate2 replica per
    core, one intra-op thread each) on the prepared audio, ``n`` digits. The recogniser runs on
    CTranslate2's own threads, so its stage is timed by process CPU (the stages run one at a time)."""

    STAGES = (*voice_bench.RawModels.STAGES, "digits")

    def __init__(self, probes: list[bytes], n: int) -> None:
        from bench.voice_digits import model_dir
        from services.voice.digits import DigitRecognizer

        self.n = n
        self.rec = DigitRecognizer(model_dir(), workers=usable_cores(), threads=1)
        super().__init__(probes)

    def verify(self, data: bytes, cpu: dict[str, list[float]] | None, aasist: bool = True):
        prepared = super().verify(data, cpu, aasist)
        c = time.process_time()
        self.rec.recognise(prepared.samples, self.n)
        if cpu is not None:
            cpu["digits"].append(time.process_time() - c)
        return prepared


def challenge_arm(args, answers: Answers) -> tuple[list[dict], float, list[bytes], Counter]:
    """A voice service with the default policy; enrol, then the levels with the challenge.
    -> (levels, peak RSS MB, the answers the first level sent, outcomes over all levels)."""
    import grpc

    from services.common.api.v1 import common_pb2, voice_pb2, voice_pb2_grpc
    from services.common.client import connect
    from services.common.storage import ConsentRecord, open_storage
    from services.common.wire import details_of
    from tests.mfa import spoken_digits as sd

    prefix = f"biogate-bench:{uuid.uuid4().hex[:8]}"
    levels: list[dict] = []
    sent: list[bytes] = []
    outcomes: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        svc = voice_bench.start_service(tmp, prefix)
        try:
            settings = load_config(tmp / "config.yaml")
            token = json.loads(settings.dev_credentials_file.read_text())["dev-all"]
            storage = open_storage(settings.storage_dsn, settings.storage)
            stub = voice_pb2_grpc.VoiceServiceStub(connect(svc.address, token))
            subjects: list[tuple[str, str]] = []  # (subject id, speaker)
            for speaker in sd.SPEAKERS:
                utterances = [common_pb2.Audio(data=u) for u in sd.enrolment(speaker, 16000)]
                for k in range(args.subjects):
                    subject = f"bench-{speaker}-{k}"
                    storage.subjects.record_consent(ConsentRecord(TENANT, subject, "biometric_verification",
                                                                  ("voice",), "bench", "bench"))
                    stub.Enroll(voice_pb2.EnrollVoiceRequest(
                        subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=subject),
                        utterances=utterances, replace=True), timeout=300)
                    subjects.append((subject, speaker))
            level_outcomes: Counter = Counter()

            async def send(stub, k: int, meta, timeout: float):
                subject, speaker = subjects[k % len(subjects)]
                ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id=subject)
                try:
                    ch = await stub.StartVoiceChallenge(voice_pb2.StartVoiceChallengeRequest(subject=ref),
                                                        metadata=meta, timeout=timeout)
                    audio = answers.answer(speaker, ch.digits)
                    reply = await stub.Verify(voice_pb2.VerifyVoiceRequest(
                        subject=ref, challenge_nonce=ch.challenge.nonce, channel=voice_pb2.VOICE_CHANNEL_WIDEBAND,
                        audio=common_pb2.Audio(data=audio, format=common_pb2.AudioFormat(
                            encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000))),
                        metadata=meta, timeout=timeout)
                except grpc.aio.AioRpcError as err:
                    level_outcomes[f"{err.code().name}:{details_of(err).get('reason', '')}"] += 1
                    raise
                if len(sent) < args.raw_clips:  # an answer the service decided on (no audio error)
                    sent.append(audio)
                level_outcomes["accepted" if reply.match else "+".join(r.code for r in reply.reasons) or "refused"] += 1
                return reply

            async def issue_only(stub, k: int, meta, timeout: float):
                subject, _ = subjects[k % len(subjects)]
                await stub.StartVoiceChallenge(voice_pb2.StartVoiceChallengeRequest(
                    subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=subject)), metadata=meta, timeout=timeout)
                return SimpleNamespace(match=False)

            def level(loop: str, rate: float | None, arm: str = "with challenge", calls=send, duration=args.duration,
                      max_requests=args.max_requests) -> dict:
                level_outcomes.clear()
                run = voice_bench.measured_level(svc, svc.address, token, TENANT, [], [], args.concurrency,
                                                 duration, max_requests, rate=rate, send=calls)
                failed = sum(run["errors"].values()) + sum(run["refused"].values())
                if failed and run["requests"]:  # refusals (admission's) cost next to nothing: CPU per decided call
                    run["service_cpu_ms_all_calls"] = run["service_cpu_ms"]
                    run["service_cpu_ms"] = round(run["service_cpu_ms"] * (run["requests"] + failed) / run["requests"], 1)
                levels.append({"arm": arm, "loop": loop, **run, "outcomes": dict(level_outcomes)})
                outcomes.update(level_outcomes)
                print(json.dumps(levels[-1]), flush=True)
                return run

            run = level("closed", None)
            if args.open_loop > 0 and run["throughput_rps"] > 0:
                level(f"open, {args.open_loop:.0%} of closed", args.open_loop * run["throughput_rps"])
            # the challenge's issue alone (a storage write and an audit record; no model): its CPU per call
            level("closed", None, "StartVoiceChallenge only", issue_only, min(10.0, args.duration), 400)
            rss = svc.peak_rss_mb()
        finally:
            svc.stop()
            voice_bench.drop_replay_keys(svc, prefix)
    return levels, rss, sent, outcomes


def raw_figures(raw: voice_bench.RawModels, clips: int, seconds: float) -> dict:
    """Median CPU ms per stage (one at a time) and the rate on one thread per core."""
    cpu = raw.cpu_ms(clips)
    out: dict = {"cpu_ms": cpu, "cpu_ms_total": round(sum(cpu.values()), 1)}
    if seconds > 0:
        out["parallel_rps"] = round(raw.parallel_rate(seconds), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--max-requests", type=int, default=200,
                    help="per closed-loop level: it stops at this many answered calls (refusals counted apart)")
    ap.add_argument("--open-loop", type=float, default=0.8)
    ap.add_argument("--subjects", type=int, default=4, help="subject ids enrolled per speaker")
    ap.add_argument("--raw-clips", type=int, default=12, help="inputs timed by the raw models, one after another")
    ap.add_argument("--raw-seconds", type=float, default=20.0, help="the raw models on one thread per core; 0: not run")
    ap.add_argument("--skip-plain", action="store_true", help="no arm without challenge")
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()

    report: dict = {"date": dt.datetime.now().isoformat(timespec="minutes"), "command": command_line(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
                    "load_start": round(os.getloadavg()[0], 1), "runs": [], "peak_rss_mb": {}, "raw": {}}
    clips: list[np.ndarray] = []
    if not args.skip_plain:
        speakers = sorted(p for p in voice_bench.FIXTURES.iterdir() if p.is_dir())
        audio = {s.name: [sf.read(f, dtype="float32")[0] for f in sorted(s.glob("*.wav"), key=lambda p: -p.stat().st_size)]
                 for s in speakers}
        clips = [voice_bench.crop(x) for xs in audio.values() for x in xs[2:]]
        plain = SimpleNamespace(workers=1, tenants=["bench"], concurrency=args.concurrency, duration=args.duration,
                                max_requests=args.max_requests, open_loop=args.open_loop)
        levels, rss = voice_bench.serve_arm(plain, "defaults", audio)
        report["runs"] += [{**lv, "arm": "without challenge"} for lv in levels]
        report["peak_rss_mb"]["without challenge"] = round(rss)
    levels, rss, sent, outcomes = challenge_arm(args, Answers(args.seed))
    report["runs"] += levels
    report["peak_rss_mb"]["with challenge"] = round(rss)
    report["outcomes"] = dict(outcomes)
    report["load_before_raw"] = round(os.getloadavg()[0], 1)
    if clips:
        raw = voice_bench.RawModels([voice_bench.pcm16(x) for x in clips])
        report["raw"]["without challenge"] = raw_figures(raw, args.raw_clips, args.raw_seconds)
        del raw
    digits = load_config(None).voice.challenge_digits
    raw = RawWithDigits(sent, digits)
    report["raw"]["with challenge"] = raw_figures(raw, args.raw_clips, args.raw_seconds)
    report["answer_s"] = round(statistics.median(len(a) / 2 / 16000 for a in sent), 2)
    report["load_end"] = round(os.getloadavg()[0], 1)
    for run in report["runs"]:
        raw_arm = report["raw"].get(run["arm"], {})
        if not raw_arm:
            continue
        raw_ms = raw_arm["cpu_ms_total"]
        run["raw_cpu_ms"] = raw_ms
        run["raw_over_service_cpu"] = round(raw_ms / run["service_cpu_ms"], 3) if run["service_cpu_ms"] else None
        if "parallel_rps" in raw_arm:
            run["of_parallel_raw"] = round(run["throughput_rps"] / raw_arm["parallel_rps"], 3)
    print(json.dumps({k: report[k] for k in ("raw", "peak_rss_mb", "outcomes", "answer_s", "load_start",
                                             "load_before_raw", "load_end")}), flush=True)
    print(table(report), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def table(report: dict) -> str:
    rows = ["| arm | loop | requests | verifications/s | p50 ms | p99 ms | p99 / p50 | service CPU ms / verification "
            "| raw CPU ms | raw / service CPU | utilisation | demand | of parallel raw | outcomes |", "|" + "---|" * 14]
    for r in report["runs"]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.get("outcomes", {}).items(), key=lambda kv: -kv[1]))
        if not outcomes:
            outcomes = (f"{r['matches']} matches" + (f", errors {r['errors']}" if r["errors"] else "")
                        + (f", refused {r['refused']}" if r.get("refused") else ""))
        rows.append(f"| {r['arm']} | {r['loop']} | {r['requests']} | {r['throughput_rps']:.2f} | {r['p50_ms']:.0f} | "
                    f"{r['p99_ms']:.0f} | {r['p99_ms'] / r['p50_ms']:.2f} | {r['service_cpu_ms']:.0f} | "
                    f"{r.get('raw_cpu_ms', float('nan')):.0f} | {r.get('raw_over_service_cpu') or float('nan'):.0%} | "
                    f"{r['utilisation']:.0%} | {r['demand']:.0%} | {r.get('of_parallel_raw', float('nan')):.0%} | "
                    f"{outcomes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
