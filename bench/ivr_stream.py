"""The IVR's voice factor unary (SubmitFactor with the whole G.711 recording, sent when the caller
has stopped) and streamed (StreamVoiceFactor, a 20 ms chunk every 20 ms as the caller speaks):
the time from the caller's last audio to the MFA's answer, through real MFA and voice services on
loopback (tests/mfa/world.py, in this process) with the default policy.

Per round: an IVR session, its digit challenge and a genuine answer the recogniser hears
(tests/mfa/spoken_digits.heard_answer, not timed; it only picks the takes, it measures no rate);
then, timed, the factor. Unary: from the call to its answer (the upload happens after the caller
stops). Streamed: from the end message (after the last chunk) handed to gRPC to the answer. Rounds
alternate the two ways.
Also the process CPU time of each timed part (the services run in this process) and, with
``--threads``, where it went: the CPU of each group of threads (Python threads by their pool's
name; "native" for threads Python did not start: gRPC core's, the inference libraries'; "exited"
for threads that ended during the part, which /proc no longer lists: gRPC's per-call request
threads).

    .venv/bin/python -m bench.ivr_stream --rounds 6 [--threads] [--holds 0,0.2]

``--holds``: the streamed rounds alternate these mfa.ivr_stream.max_hold_s (the orchestrator's
settings replaced between rounds; 0 passes each chunk on as it arrives), so that each way is
measured under the same load: unary, stream with the first, with the second, unary, ...
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.server.auth import ROLES, token_sha256
from tests.mfa import spoken_digits
from tests.mfa.world import World, running_services

F = mfa_pb2
TENANT, BANK_TOKEN, IVR_TOKEN = "bench-ivr", "tok-bench-bank", "tok-bench-ivr"
SPEAKER, CHUNK = "george", 160


def paced(session_id: str, nonce: str, audio: bytes, marks: dict[str, float]):
    """The IVR's messages: the header, then a 20 ms chunk every 20 ms; ``marks``: when the last went."""
    yield F.StreamVoiceFactorRequest(header=F.StreamVoiceFactorRequest.Header(
        session_id=session_id, challenge_nonce=nonce, binding=F.CaptureBinding(terminal=F.TerminalCapture()),
        format=common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)))
    for i in range(0, len(audio), CHUNK):
        yield F.StreamVoiceFactorRequest(chunk=audio[i:i + CHUNK])
        time.sleep(CHUNK / 8000)
    yield F.StreamVoiceFactorRequest(end=F.StreamVoiceFactorRequest.End(audio_bytes=len(audio)))
    marks["cpu"], marks["t"] = time.process_time(), time.perf_counter()


_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's live threads, summed by group (see the docstring)."""
    names = {t.native_id: re.sub(r"[-_ ]?\d+.*$", "", t.name) for t in threading.enumerate()}
    out: dict[str, float] = defaultdict(float)
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile
            continue
        out[names.get(int(task), "native")] += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", action="store_true", help="also the CPU of the whole factor by thread group")
    ap.add_argument("--holds", default="", help="comma-separated mfa.ivr_stream.max_hold_s the stream rounds alternate")
    args = ap.parse_args(argv)
    holds = [float(h) for h in args.holds.split(",") if h]
    ways = ["unary"] + ([f"stream {h:g}" for h in holds] or ["stream"])
    principals: list[dict] = [
        {"name": "bank-backend", "roles": list(ROLES), "token_sha256": token_sha256(BANK_TOKEN)},
        {"name": "ivr-platform", "roles": ["orchestrator"], "token_sha256": token_sha256(IVR_TOKEN),
         "terminal": {"channel": "ivr"}}]
    times: dict[str, list[tuple[float, float, float]]] = {way: [] for way in ways}
    groups: dict[str, dict[str, list[float]]] = {way: defaultdict(list) for way in ways}
    with tempfile.TemporaryDirectory() as tmp, running_services(Path(tmp), principals, BANK_TOKEN) as (bio, mfa):
        world = World(bio, mfa, TENANT, ivr_token=IVR_TOKEN)
        orchestrator = mfa.running["mfa"].definition.service
        settings = orchestrator.settings
        print(f"mfa.ivr_stream.max_hold_s {settings.mfa.ivr_stream.max_hold_s:g}; "
              f"load average {Path('/proc/loadavg').read_text().strip()}", flush=True)
        ref = world.enrol("bench-caller", utterances=spoken_digits.enrolment(SPEAKER), phone="+8613900000501")
        for n in range(len(ways) * args.rounds):
            way = ways[n % len(ways)]
            if holds and way != "unary":
                ivr = settings.mfa.ivr_stream.model_copy(update={"max_hold_s": float(way.split()[1])})
                orchestrator.settings = settings.model_copy(
                    update={"mfa": settings.mfa.model_copy(update={"ivr_stream": ivr})})
            for attempt in range(5):  # a new challenge where no combination of takes was heard as its digits
                s = world.start_ivr(ref)
                challenge = world.voice_challenge(s, world.ivr)
                audio = spoken_digits.heard_answer(world.voice_engine, challenge.digits, SPEAKER,
                                                   random.Random(100 * n + attempt),
                                                   subject=(ref.tenant_id, ref.subject_id), telephone=True)
                if audio is not None:
                    break
            assert audio is not None
            nonce = challenge.challenge.nonce
            threads_before = thread_cpu() if args.threads else {}
            if way == "unary":
                cpu, t0 = time.process_time(), time.perf_counter()
                r = world.submit(s, stub=world.ivr, voice=world.ivr_voice(s, audio, nonce))
                last_cpu, last = cpu, t0
            else:
                marks: dict[str, float] = {}
                cpu = time.process_time()
                assert world.ivr is not None
                r = world.ivr.StreamVoiceFactor(paced(s.session_id, nonce, audio, marks), timeout=120)
                last_cpu, last = marks["cpu"], marks["t"]
            after, after_cpu = time.perf_counter(), time.process_time()
            if args.threads:
                spent = {g: v - threads_before.get(g, 0.0) for g, v in thread_cpu().items()}
                spent["exited"] = after_cpu - cpu - sum(spent.values())
                for g, v in spent.items():
                    groups[way][g].append(v)
            assert r.result.passed, r
            times[way].append((after - last, after_cpu - last_cpu, after_cpu - cpu))
            print(f"{way:10s} audio {len(audio) / 8000:.2f} s  after last audio {1000 * (after - last):7.1f} ms  "
                  f"CPU after last audio {1000 * (after_cpu - last_cpu):7.1f} ms  CPU in all {1000 * (after_cpu - cpu):7.1f} ms",
                  flush=True)
        world.close()
    for way, rows in times.items():
        print(f"{way}: median after last audio {1000 * statistics.median(w for w, _, _ in rows):.1f} ms wall, "
              f"{1000 * statistics.median(c for _, c, _ in rows):.1f} ms CPU; CPU in all "
              f"{1000 * statistics.median(a for _, _, a in rows):.1f} ms (n={len(rows)})")
        if args.threads:
            print(f"  {way} CPU of the whole factor by thread group, median ms: " + ", ".join(
                f"{g} {1000 * statistics.median(v + [0.0] * (len(rows) - len(v))):.0f}"
                for g, v in sorted(groups[way].items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
