"""GPU benchmark: the face and voice services on CUDA, against the raw models on the same GPU in the same run.

    python -m bench.gpu_bench --part env|raw|paths|face|voice|jpeg [--levels 1 16 64] [--duration 15] --out DIR

Written for the lent GPU machine (`../shared/docs/GPU.md`: onnxruntime-gpu, torch with CUDA), and
runs anywhere: on a machine without a GPU every model falls back to the CPU and the report says so.
Each part writes ``DIR/<part>.json``:

  env    providers onnxruntime offers, torch's CUDA device, nvidia-smi;
  raw    the models alone on the configured providers, per item at batch 1 and batched:
         ECAPA (3 s clips, SpeechBrain fbank on the CPU + ONNX network), AASIST (3 s windows, torch),
         YuNet (640x640 canvas), MobileFaceNet, MiniFASNet;
  paths  the voice service's GPU paths (VoiceConfig ecapa_device_features, ecapa_io_binding,
         ecapa_frame_buckets, antispoof_dtype/_compile/_pad_batches) against its default paths in
         the same process: max differences, and items/s of each. Torch and onnxruntime only, so it
         runs without onnxruntime-gpu too (ECAPA's network then on the CPU); on a CPU machine use
         a tiny --batch (it is the correctness run; --inductor compiles AASIST for real, ~4 min).
         The voice part takes the same options from BIOGATE_VOICE__* variables set before the run
         (e.g. BIOGATE_VOICE__ANTISPOOF_DTYPE=bfloat16, BIOGATE_VOICE__ANTISPOOF_COMPILE=true);
  face   `biogate serve face` in its own process, Verify under a bounded async load per level
         (optionally with passive liveness), peak RSS of the service;
  voice  `biogate serve voice` likewise, Verify of 3 s 16 kHz clips with every layer (ECAPA,
         AASIST, replay cache) and without AASIST;
  jpeg   the face fixtures' JPEGs decoded by OpenCV, nvImageCodec's CPU backend (libjpeg-turbo) and,
         with a GPU and the gpu extra, its nvJPEG backend (face.jpeg_decoder): wall and process CPU
         ms per image one at a time, the whole decode_image path (Pillow's checks first), nvImageCodec's
         batched call (--batch images), and each decoder's max abs pixel difference to OpenCV's.

GPU settings of the services (bigger batches, one batcher per model, more server threads, an
in-memory replay store since the lent machine has no Redis) are set here through BIOGATE_*
variables, the same ones a deployment would set (deploy/biogate.example.yaml).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import face_bench, voice_bench
from bench.harness import MODEL_CACHE as CACHE
from bench.harness import ServiceProcess
from services.settings import load_config

GPU_ENV = {
    "BIOGATE_MODELS__CACHE_DIR": str(CACHE),
    "BIOGATE_LOGGING__LEVEL": "WARNING",
    "BIOGATE_SERVER__MAX_WORKERS": "128",
    "BIOGATE_SERVER__MAX_CONCURRENT_RPCS": "512",
    "BIOGATE_FACE__BATCH_MAX": "64",
    "BIOGATE_VOICE__BATCH_MAX": "64",
    "BIOGATE_VOICE__INFERENCE_WORKERS": "1",
    "BIOGATE_VOICE__MAX_PAD_RATIO": "0.25",
    "BIOGATE_VOICE__MAX_BATCH_AUDIO_S": "400",
    "BIOGATE_VOICE__ANTISPOOF_BATCH_MAX": "64",
    "BIOGATE_VOICE__REPLAY_STORE": "memory",
}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def part_env() -> dict:
    import onnxruntime as ort
    import torch

    info = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def voice_clips_whole() -> list[np.ndarray]:
    import soundfile as sf

    return [sf.read(f, dtype="float32")[0] for f in sorted(voice_bench.FIXTURES.glob("*/*.wav"))]


def voice_clips() -> list[np.ndarray]:
    return [voice_bench.crop(x) for x in voice_clips_whole()]


def part_raw(batch: int) -> dict:
    from services.common.models import ModelStore
    from services.face.align import align_face
    from services.face.detection import letterbox
    from services.face.imaging import decode_image
    from services.face.models import pipeline_config as face_pipeline_config
    from services.face.pipeline import FacePipeline
    from services.face.yunet import YuNetDetector
    from services.voice.aasist import AasistDetector, torch_device
    from services.voice.evaluation import pipeline_from_settings

    settings = load_config(None, models={"cache_dir": str(CACHE)})
    providers = tuple(settings.models.providers)
    store = ModelStore(settings)
    out: dict = {"batch": batch}

    clips = [c for c in voice_clips() if len(c) == int(voice_bench.CLIP_S * 16000)]
    pipe = pipeline_from_settings(settings, max_batch_audio_s=1000.0)
    out["ecapa_provider"] = pipe.provider
    many = (clips * (batch // len(clips) + 1))[:batch]
    t1 = timed(lambda: pipe.embedder.embed_batch(clips[:1]), 20)
    tb = timed(lambda: pipe.embedder.embed_batch(many), 5)
    out["ecapa"] = {"batch1_ms": round(1000 * t1, 2), f"batch{batch}_ms_per_clip": round(1000 * tb / batch, 3),
                    "batch1_per_s": round(1 / t1, 1), f"batch{batch}_per_s": round(batch / tb, 1)}
    det = AasistDetector(store.path("aasist", "AASIST.pth"), store.path("aasist", "AASIST_config.json"),
                         threads=None, max_windows=1, device=torch_device(providers))
    out["aasist_device"] = str(det.device)
    win = np.stack([c[:48000] for c in many])
    a1 = timed(lambda: det.logits(win[:1]), 10)
    ab = timed(lambda: det.logits(win), 3)
    out["aasist"] = {"batch1_ms": round(1000 * a1, 2), f"batch{batch}_ms_per_window": round(1000 * ab / batch, 3),
                     "batch1_per_s": round(1 / a1, 1), f"batch{batch}_per_s": round(batch / ab, 1)}

    images, _ = face_bench.trial_pairs()
    p = FacePipeline(face_pipeline_config(store, detector="yunet-2023mar-batch", providers=providers, threads=None,
                                          liveness=("minifasnet-v2-2.7", "minifasnet-v1se-4.0")))
    det_f = p.detector
    assert isinstance(det_f, YuNetDetector)  # yunet-2023mar-batch
    out["face_provider"] = det_f.model.provider
    ims = [decode_image(f.read_bytes()) for f in images[:16]]
    canvas = letterbox(ims[0], det_f.input_size, det_f.pad_ratio).canvas.transpose(2, 0, 1)[None].astype(np.float32)
    d1 = timed(lambda: det_f.model.session.run(det_f._outputs, {det_f._input: canvas}), 20)
    canvases = np.concatenate([canvas] * batch)
    try:
        db = timed(lambda: det_f.model.session.run(det_f._outputs, {det_f._input: canvases}), 5)
    except Exception:  # a detector copy with a fixed batch of 1
        db = d1 * batch
    faces = [det_f.detect(im)[0] for im in ims]
    crops = np.concatenate([align_face(im, f)[None] for im, f in zip(ims, faces, strict=True)])
    crops = np.concatenate([crops] * (batch // len(crops) + 1))[:batch]
    emb = next(iter(p.embedders.values()))
    e1 = timed(lambda: emb.embed(crops[:1]), 20)
    eb = timed(lambda: emb.embed(crops), 5)
    liveness = p.liveness
    assert liveness is not None
    live = [liveness.crops(im, f) for im, f in zip(ims, faces, strict=True)]
    live = (live * (batch // len(live) + 1))[:batch]
    l1 = timed(lambda: liveness.score_crops(live[:1]), 20)
    lb = timed(lambda: liveness.score_crops(live), 5)
    p.close()
    for name, one, many_s in (("yunet_640", d1, db), ("mobilefacenet", e1, eb), ("minifasnet_pair", l1, lb)):
        out[name] = {"batch1_ms": round(1000 * one, 2), f"batch{batch}_ms_per_item": round(1000 * many_s / batch, 3),
                     "batch1_per_s": round(1 / one, 1), f"batch{batch}_per_s": round(batch / many_s, 1)}
    return out


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (compiler workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def rate(n: int, seconds: float) -> dict:
    return {"ms_per_item": round(1000 * seconds / n, 3), "per_s": round(n / seconds, 1)}


def part_paths(batch: int, inductor: bool) -> dict:
    import torch

    from services.common.models import ModelStore
    from services.common.modality.calibration import Calibrations
    from services.voice.aasist import AasistDetector, AasistOptions, torch_device
    from services.voice.ecapa import frame_bucket
    from services.voice.evaluation import pipeline_from_settings

    settings = load_config(None, models={"cache_dir": str(CACHE)})
    providers = tuple(settings.models.providers)
    store = ModelStore(settings)
    device = torch_device(providers)
    out: dict = {"batch": batch, "torch_device": device, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)

    # ECAPA: per-clip Fbank on the CPU + plain run (the CPU default) against batched Fbank on the
    # session's device + IO binding, on the same 3 s clips; then the frame buckets on whole clips.
    full = voice_clips_whole()
    clips = [voice_bench.crop(x) for x in full if len(x) >= int(voice_bench.CLIP_S * 16000)]
    many = (clips * (batch // len(clips) + 1))[:batch]
    host = pipeline_from_settings(settings, max_batch_audio_s=1000.0, max_batch=max(batch, 1),
                                  device_features=False, io_binding=False).embedder
    dev = pipeline_from_settings(settings, max_batch_audio_s=1000.0, max_batch=max(batch, 1),
                                 device_features=True, io_binding=True).embedder
    out["ecapa_provider"] = host.provider
    a, b = host.embed_batch(many), dev.embed_batch(many)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    out["ecapa_device_vs_host"] = {"clips": len(many), "max_abs_diff": float(np.abs(a - b).max()),
                                   "max_abs_value": float(np.abs(a).max()), "min_cosine": float(cos.min())}
    for name, model in (("ecapa_host_path", host), ("ecapa_device_path", dev)):
        out[name] = rate(batch, timed(lambda m=model: m.embed_batch(many), 3))
    bucketed = pipeline_from_settings(settings, max_batch_audio_s=1000.0, max_batch=max(batch, 1), max_pad_ratio=0.25,
                                      device_features=True, io_binding=True, frame_buckets=True).embedder
    whole = [x[: 20 * 16000] for x in full[:: max(1, len(full) // 48)]]
    exact, padded = host.embed_batch(whole), bucketed.embed_batch(whole)
    cos = (exact * padded).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(padded, axis=1)
    frames = [1 + len(x) // 160 for x in whole]
    out["ecapa_frame_buckets_0.25"] = {"clips": len(whole), "min_cosine": float(cos.min()),
                                       "mean_cosine": float(cos.mean()),
                                       "shapes": len({frame_bucket(t, 0.25) for t in frames}),
                                       "lengths": len(set(frames))}

    # AASIST: fp32 eager (the default) against bf16, compiled and padded, on 3 s windows of the same
    # clips; decisions on the shipped wideband threshold.
    weights, conf = store.path("aasist", "AASIST.pth"), store.path("aasist", "AASIST_config.json")
    threshold = Calibrations(settings.models.manifest).threshold("aasist", "wideband", 0.05,
                                                                 "bonafide_log_odds@speech3s")
    wins = np.stack([c[:48000] for c in many])
    backend = "inductor" if inductor or device == "cuda" else "eager"
    # One shape here (the batch): the compiled variants compile once, in their first call.
    variants = {"fp32": AasistOptions(), "bf16": AasistOptions(dtype="bfloat16"),
                f"compiled_{backend}_fp32": AasistOptions(compile=True, compile_backend=backend),
                f"compiled_{backend}_bf16": AasistOptions(dtype="bfloat16", compile=True, compile_backend=backend)}
    scores: dict[str, np.ndarray] = {}
    for name, options in variants.items():
        det = AasistDetector(weights, conf, threads=None, max_windows=1, device=device, options=options)
        t, c = time.perf_counter(), cpu_s()
        logits = det.logits(wins)
        first = {"first_call_s": round(time.perf_counter() - t, 1), "first_call_cpu_s": round(cpu_s() - c, 1)}
        scores[name] = logits[:, 1] - logits[:, 0]
        ref = scores["fp32"]
        out[f"aasist_{name}"] = {**first, **rate(batch, timed(lambda d=det: d.logits(wins), 3)),
                                 "max_abs_score_diff_vs_fp32": float(np.abs(scores[name] - ref).max()),
                                 "decisions_differing_vs_fp32": int(((scores[name] >= threshold) != (ref >= threshold)).sum())}
    out["aasist_windows"] = len(wins)
    out["aasist_threshold"] = threshold
    out["aasist_fp32_scores_range"] = [float(scores["fp32"].min()), float(scores["fp32"].max())]
    return out


def summarise(lat: list[float], wall: float, errors: dict, **extra) -> dict:
    return {**extra, "requests": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(lat) / wall, 1) if wall else 0.0,
            "p50_ms": round(voice_bench.pct(lat, 50), 1), "p99_ms": round(voice_bench.pct(lat, 99), 1)}


def part_face(levels: list[int], duration: float, liveness: bool) -> dict:
    import grpc

    from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
    from services.common.storage import ConsentRecord, open_storage

    os.environ.update(GPU_ENV)
    images, pairs = face_bench.trial_pairs()
    datas = [p.read_bytes() for p in images]
    runs = []
    with tempfile.TemporaryDirectory(prefix="gpu-face-") as tmp:
        svc = ServiceProcess("face", data_dir=Path(tmp))
        try:
            svc.start()
            start_s = svc.start_s
            storage = open_storage(svc.settings.storage_dsn, svc.settings.storage)
            for i in range(len(images)):
                storage.subjects.record_consent(ConsentRecord("bench", f"s{i}", "biometric_verification", ("face",), "v1"))
            storage.close()
            with grpc.insecure_channel(svc.address) as ch:
                stub = face_pb2_grpc.FaceServiceStub(ch)
                md = (("authorization", f"Bearer {svc.token()}"),)
                for i, d in enumerate(datas):
                    stub.Enroll(face_pb2.EnrollFaceRequest(
                        subject=common_pb2.SubjectRef(tenant_id="bench", subject_id=f"s{i}"),
                        images=[common_pb2.Image(data=d)]), metadata=md, timeout=60)
            requests = [face_pb2.VerifyFaceRequest(subject=common_pb2.SubjectRef(tenant_id="bench", subject_id=f"s{e}"),
                                                   image=common_pb2.Image(data=datas[p]), require_liveness=liveness)
                        for e, p in pairs]
            for c in levels:
                asyncio.run(face_bench.run_load(svc.address, svc.token(), requests, c, 2.0, 200))
                run = asyncio.run(face_bench.run_load(svc.address, svc.token(), requests, c, duration, 100000))
                runs.append(summarise(run.latencies_s, run.wall_s, dict(run.errors), concurrency=c, liveness=liveness,
                                      refused=dict(run.refused)))
                print(json.dumps(runs[-1]), flush=True)
            rss = svc.peak_rss_mb()
        finally:
            svc.stop()
    return {"start_to_serving_s": round(start_s, 1), "peak_rss_mb": round(rss), "runs": runs, "env": GPU_ENV}


def part_voice(levels: list[int], duration: float) -> dict:
    import grpc

    from services.common.api.v1 import common_pb2, voice_pb2, voice_pb2_grpc
    from services.common.storage import ConsentRecord, open_storage

    os.environ.update(GPU_ENV)
    import soundfile as sf

    speakers = sorted(p for p in voice_bench.FIXTURES.iterdir() if p.is_dir())
    audio = {s.name: [sf.read(f, dtype="float32")[0] for f in sorted(s.glob("*.wav"), key=lambda p: -p.stat().st_size)]
             for s in speakers}
    runs = []
    with tempfile.TemporaryDirectory(prefix="gpu-voice-") as tmpdir:
        tmp = Path(tmpdir)
        t = time.perf_counter()
        svc = voice_bench.start_service(tmp, f"biogate-gpu-bench:{os.getpid()}")
        target = svc.address
        try:
            start_s = time.perf_counter() - t
            settings = load_config(tmp / "config.yaml")
            token = json.loads(settings.dev_credentials_file.read_text())["dev-all"]
            storage = open_storage(settings.storage_dsn, settings.storage)
            subjects: dict[str, list[str]] = {}
            probes = []
            with grpc.insecure_channel(target) as ch:
                stub = voice_pb2_grpc.VoiceServiceStub(ch)
                md = (("authorization", f"Bearer {token}"),)
                for tenant in ("bench", "bench-nosynth"):
                    subjects[tenant] = []
                    for name, xs in audio.items():
                        subject = f"bench-{name.replace('_', '-')}"
                        storage.subjects.record_consent(ConsentRecord(tenant, subject, "biometric_verification",
                                                                      ("voice",), "bench", "bench"))
                        try:
                            stub.Enroll(voice_pb2.EnrollVoiceRequest(
                                subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject),
                                utterances=[common_pb2.Audio(data=voice_bench.sf_bytes(x)) for x in xs[:2]]),
                                metadata=md, timeout=120)
                        except grpc.RpcError as err:
                            print(f"enrolment of {name} refused: {err.details()}", file=sys.stderr)
                            continue
                        subjects[tenant].append(subject)
                        if tenant == "bench":
                            probes.append([(np.clip(voice_bench.crop(x), -1, 1) * 32767).astype("<i2").tobytes()
                                           for x in xs[2:]])
            storage.close()
            for tenant in ("bench", "bench-nosynth"):
                for c in levels:
                    asyncio.run(voice_bench.load(target, token, tenant, subjects[tenant], probes, c, 2.0, 100))
                    run = asyncio.run(voice_bench.load(target, token, tenant, subjects[tenant], probes, c, duration,
                                                       100000))
                    print(json.dumps(run), flush=True)
                    runs.append(run)
            rss = svc.peak_rss_mb()
        finally:
            svc.stop()
    return {"start_to_serving_s": round(start_s, 1), "peak_rss_mb": round(rss), "runs": runs, "env": GPU_ENV}


def part_jpeg(batch: int, seconds: float) -> dict:
    from services.face.imaging import NvImageCodecJpeg, decode_image, opencv_jpeg

    images, _ = face_bench.trial_pairs()
    datas = [f.read_bytes() for f in images if f.suffix.lower() in (".jpg", ".jpeg")]
    out: dict = {"images": len(datas), "mean_kb": round(sum(map(len, datas)) / len(datas) / 1024, 1),
                 "cpu_count": os.cpu_count(), "seconds_per_figure": seconds}
    decoders: dict = {"opencv": opencv_jpeg}
    for backend in ("cpu", "gpu"):
        try:
            decoders[f"nvimgcodec-{backend}"] = NvImageCodecJpeg(backend)
        except (ImportError, RuntimeError) as exc:
            out[f"nvimgcodec-{backend}"] = f"unavailable: {str(exc)[:200]}"
    reference = [opencv_jpeg(d) for d in datas]

    def per_image(fn) -> dict:
        """Passes over the images for about ``seconds``: wall and this process's CPU per image."""
        for d in datas:
            fn(d)
        n, c0, t0 = 0, cpu_s(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for d in datas:
                fn(d)
            n += len(datas)
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        return {**rate(n, wall), "cpu_ms_per_image": round(1000 * cpu / n, 3)}

    for name, dec in decoders.items():
        got = [dec(d) for d in datas]
        diffs = [int(np.abs(g.astype(np.int16) - r).max()) for g, r in zip(got, reference, strict=True)
                 if g is not None and r is not None and g.shape == r.shape]
        entry = {"decoded": sum(g is not None for g in got), "max_abs_diff_to_opencv": max(diffs, default=None),
                 "images_differing": sum(d > 0 for d in diffs),
                 "raw": per_image(dec), "decode_image": per_image(lambda d, dec=dec: decode_image(d, jpeg=dec))}
        if isinstance(dec, NvImageCodecJpeg):
            many = (datas * (batch // len(datas) + 1))[:batch]
            dec.decode_batch(many)
            n, c0, t0 = 0, cpu_s(), time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                dec.decode_batch(many)
                n += batch
            entry[f"batch{batch}"] = {**rate(n, time.perf_counter() - t0),
                                      "cpu_ms_per_image": round(1000 * (cpu_s() - c0) / n, 3)}
        out[name] = entry
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("env", "raw", "paths", "face", "voice", "jpeg"), required=True)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per load level")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the raw-model and jpeg figures")
    ap.add_argument("--liveness", action="store_true", help="face: Verify with require_liveness")
    ap.add_argument("--inductor", action="store_true", help="paths: compile AASIST with inductor on the CPU too")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    if args.part == "env":
        report = part_env()
    elif args.part == "raw":
        report = part_raw(args.batch)
    elif args.part == "paths":
        report = part_paths(args.batch, args.inductor)
    elif args.part == "face":
        report = part_face(args.levels, args.duration, args.liveness)
    elif args.part == "jpeg":
        report = part_jpeg(args.batch, args.duration)
    else:
        report = part_voice(args.levels, args.duration)
    name = args.part + ("-liveness" if args.part == "face" and args.liveness else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report if args.part in ("env", "raw", "paths", "jpeg") else {k: v for k, v in report.items() if k != "runs"}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
