"""Genuine fixture speech through every layer of a running VoiceService, per channel.

    .venv/bin/python -m bench.voice_genuine_layers [--channels wideband telephone] [--probes whole stream]
                                                  [--out FILE.json]

Starts a real `biogate serve voice` process (default configuration and manifest: AASIST, replay
cache, calibrated thresholds), then for every fixture speaker and channel enrols the two longest
recordings (wideband: the WAV; telephone: 8 kHz mu-law bytes of the telephone simulation, as an IVR
sends) and verifies each of the speaker's other recordings:

  whole   the recording in one Verify call;
  stream  the recording in 20 ms chunks through StreamVerify: the service decides once
          `voice.stream_target_net_speech_s` of net speech has arrived (3 s: an IVR caller's
          phrase, the first ~4 s of the recording), the rest is never sent.

Each (speaker, channel, probe kind) is a subject of its own, so that the replay cache only ever sees
distinct captures. Where a layer refuses, the audit record the service wrote says which one and
with what score against which threshold; those are reported per refusal. One setting differs from
the defaults, as in tests/voice: the enrolment minimum of net speech is 1 s per utterance and in
all (default 2 s and 4 s), because one fixture speaker's recordings hold under 2 s each; what is
measured here is the layers, not the capture-length policy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from bench import voice_bench
from bench.harness import command_line
from services.settings import load_config
from services.voice import telephone

FIXTURES = voice_bench.FIXTURES
CHUNK_S = 0.02
# Environment settings: merged into the service's configuration (pydantic-settings, BIOGATE_ prefix).
ENROL_MINIMUMS = {"BIOGATE_VOICE__MIN_NET_SPEECH_ENROLL_S": "1.0", "BIOGATE_VOICE__MIN_TOTAL_NET_SPEECH_ENROLL_S": "1.0",
                  # the fixtures' sentences are text-independent: tenant "genuine" without the digit challenge
                  "BIOGATE_VOICE__TENANTS": '{"genuine": {"require_challenge": false}}'}


def channel_audio(x: np.ndarray, channel: str):
    """-> (Audio for a unary call, raw bytes, their format and the bytes per chunk for a stream)"""
    from services.common.api.v1 import common_pb2

    if channel == "telephone":
        data = telephone.encode(x, 16000)
        fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)
        return common_pb2.Audio(data=data, format=fmt), data, fmt, int(8000 * CHUNK_S)
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000)
    return common_pb2.Audio(data=voice_bench.sf_bytes(x)), pcm, fmt, 2 * int(16000 * CHUNK_S)


def refusal(reply, audit: dict) -> dict:
    """Which layers refused a Verify, with the scores the service logged."""
    layers = audit.get("layers", {})
    out = {}
    if not reply.match and reply.score < reply.threshold:
        out["speaker"] = {"score": round(reply.score, 4), "threshold": round(reply.threshold, 4)}
    synthetic = layers.get("synthetic", {})
    if synthetic.get("checked") and not synthetic.get("passed"):
        out["synthetic"] = {"score": synthetic.get("score")}
    if not layers.get("replay", {}).get("passed", True):
        out["replay"] = {"similarity": layers["replay"].get("similarity")}
    return out


def run(stub, storage, consent, speakers: dict, channel: str, kind: str, tenant: str) -> dict:
    import grpc

    from services.common.api.v1 import common_pb2, voice_pb2

    vchannel = voice_pb2.VOICE_CHANNEL_TELEPHONE if channel == "telephone" else voice_pb2.VOICE_CHANNEL_WIDEBAND
    result: dict[str, Any] = {"channel": channel, "probes": kind, "verifications": 0, "accepted": 0, "refused": [],
              "enrolments": 0, "utterances_left_out": [], "enrolments_refused": [], "records": []}
    for name, (paths, xs) in speakers.items():
        subject = f"gl-{kind}-{channel}-{name.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
        consent(tenant, subject)
        ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)
        try:
            enrolled = stub.Enroll(voice_pb2.EnrollVoiceRequest(
                subject=ref, utterances=[channel_audio(x, channel)[0] for x in xs[:2]], channel=vchannel), timeout=300)
        except grpc.RpcError as err:
            last = storage.audit.last()
            audit = json.loads(last.details) if last.event_type == "voice.enrol_refused" else {}
            result["enrolments_refused"].append({"speaker": name, "files": [p.name for p in paths[:2]],
                                                 "status": err.code().name, "details": err.details(), "audit": audit})
            result["verifications"] += len(xs) - 2
            result["refused"] += [{"speaker": name, "file": p.name, "layers": {"enrolment": True}} for p in paths[2:]]
            continue
        result["enrolments"] += 1
        result["utterances_left_out"] += [{"speaker": name, "file": paths[u.index].name}
                                          for u in enrolled.utterances if not u.accepted]
        for path, x in zip(paths[2:], xs[2:], strict=True):
            audio, raw, fmt, step = channel_audio(x, channel)
            if kind == "whole":
                reply = stub.Verify(voice_pb2.VerifyVoiceRequest(subject=ref, audio=audio, channel=vchannel), timeout=300)
            else:
                header = voice_pb2.StreamVerifyVoiceRequest.Header(subject=ref, format=fmt, channel=vchannel)
                messages = [voice_pb2.StreamVerifyVoiceRequest(header=header)] + [
                    voice_pb2.StreamVerifyVoiceRequest(chunk=raw[i : i + step]) for i in range(0, len(raw), step)] + [
                    voice_pb2.StreamVerifyVoiceRequest(end=voice_pb2.StreamVerifyVoiceRequest.End(audio_bytes=len(raw)))]
                reply = stub.StreamVerify(iter(messages), timeout=300)
            audit = json.loads(storage.audit.last().details)
            result["verifications"] += 1
            result["accepted"] += reply.match
            record = {"speaker": name, "file": path.name, "match": reply.match, "score": round(reply.score, 4),
                      "threshold": round(reply.threshold, 4), "net_speech_s": round(reply.quality.net_speech_s, 2),
                      "synthetic": audit.get("layers", {}).get("synthetic", {}).get("score")}
            result["records"].append(record)
            if not reply.match:
                result["refused"].append({"speaker": name, "file": path.name, "layers": refusal(reply, audit)})
        print(json.dumps({k: result[k] for k in ("channel", "probes", "verifications", "accepted")}), flush=True)
    result["accept_rate"] = round(result["accepted"] / max(result["verifications"], 1), 4)
    return result


def drop_replay_keys(url: str, prefix: str) -> None:
    """The run's replay fingerprints (the service kept them under a key prefix of its own)."""
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", nargs="+", default=["wideband", "telephone"], choices=("wideband", "telephone"))
    ap.add_argument("--probes", nargs="+", default=["whole", "stream"], choices=("whole", "stream"))
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()

    speakers = {}
    for d in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        paths = sorted(d.glob("*.wav"), key=lambda p: (-p.stat().st_size, p.name))
        speakers[d.name] = (paths, [sf.read(p, dtype="float32")[0] for p in paths])
    report: dict = {"date": dt.date.today().isoformat(), "command": command_line(),
                    "load_average": round(os.getloadavg()[0], 1), "runs": []}
    prefix = f"biogate-bench:{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        os.environ.update(ENROL_MINIMUMS)
        svc = voice_bench.start_service(tmp, prefix)
        target = svc.address
        try:
            from services.common.api.v1 import voice_pb2_grpc
            from services.common.client import connect
            from services.common.storage import ConsentRecord, open_storage

            settings = load_config(tmp / "config.yaml")
            token = json.loads(settings.dev_credentials_file.read_text())["dev-all"]
            storage = open_storage(settings.storage_dsn, settings.storage)
            stub = voice_pb2_grpc.VoiceServiceStub(connect(target, token))

            def consent(tenant: str, subject: str) -> None:
                storage.subjects.record_consent(ConsentRecord(tenant, subject, "biometric_verification",
                                                              ("voice",), "bench", "bench"))

            for channel in args.channels:
                for kind in args.probes:
                    r = run(stub, storage, consent, speakers, channel, kind, "genuine")
                    print(json.dumps({k: v for k, v in r.items() if k != "records"}), flush=True)
                    report["runs"].append(r)
        finally:
            svc.stop()
            drop_replay_keys(load_config(tmp / "config.yaml").voice.replay_store, prefix)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
