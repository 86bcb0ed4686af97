"""The face service's CPU per Verify, and where it goes outside the models: source trees compared in
one window, their runs alternated (A B A B ...), since the machine's other jobs move absolute
figures from minute to minute.

    .venv/bin/python -m bench.face_overhead [--trees /work/base .] [--rounds 2] [--calls 1500]
        [--concurrency 8] [--workers 2] [--mode plain|liveness] [--stages]

Each run starts the real service of one tree (``biogate serve face`` from that tree's sources,
``server.workers`` processes, default models, a fresh data directory), enrols face_bench's subjects,
warms up, then sends ``--calls`` Verify at ``--concurrency`` over as many connections (face_bench's
probes, shuffled order) and reads the service's process CPU (all its processes, /proc) before and
after: CPU per call. Every answer is kept by request: the trees' answers must be identical byte for
byte (scores, decisions, quality), which the script checks and prints.

``--stages``: the service's processes also sum the thread CPU spent inside the stages below
(bench/stage_cpu/sitecustomize.py; nested stages are included in their callers'), printed as ms per
call; "models" is onnxruntime's ``InferenceSession.run`` (intra-op threads 1: on the calling thread).
The wrappers cost a few microseconds per call each: compare stage runs with stage runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import grpc

from bench.face_bench import TENANT, enrol, plain_requests, trial_pairs
from bench.harness import FIXTURES, ROOT, ServiceProcess, ThreadSampler, child_pids, machine_line
from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc

STAGES = {
    "models (onnxruntime run)": "onnxruntime.capi.onnxruntime_inference_collection:InferenceSession.run",
    "interceptor: call set-up": "services.common.server.interceptor:_Call.__enter__",
    "interceptor: authorise": "services.common.server.interceptor:_Call.authorise",
    "interceptor: tenant check": "services.common.server.interceptor:_Call.check_request",
    "interceptor: admit": "services.common.server.interceptor:_Call.admit",
    "interceptor: finish": "services.common.server.interceptor:_Call.__exit__",
    "interceptor: handler lookup": "services.common.server.interceptor:ServerInterceptor.intercept_service",
    "FaceService.verify (all of it)": "services.face.service:FaceService.verify",
    "  template read + decrypt": "services.face.service:FaceService._template",
    "  decode": "services.face.service:FaceService._decode",
    "  analysis (models included)": "services.face.service:FaceService._probe",
    "    detector (models included)": "services.face.yunet:YuNetDetector.detect_batch",
    "      placement (shrink, canvas write)": "services.face.detection:CanvasBlob.place",
    "      post-processing (decode, NMS)": "services.face.yunet:YuNetDetector._decode",
    "    subject choice": "services.face.pipeline:choose_subject",
    "    alignment": "services.face.pipeline:align_face",
    "    quality gates": "services.face.pipeline:assess",
    "    embedder (model included)": "services.face.arcface:ArcFaceEmbedder.embed",
    "  audit append (all of it)": "services.common.audit.log:AuditLog.append",
    "    storage: transaction, insert, commit": "services.common.storage.audit:SqlAuditRepository._write",
    "    tail check (head signature)": "services.common.audit.log:AuditLog._check_tail",
}


class TreeService(ServiceProcess):
    """The face service run from the sources of ``root``, with the stage wrappers when ``stages_dir``."""

    def __init__(self, root: Path, config: dict, data_dir: Path, stages_dir: Path | None) -> None:
        super().__init__("face", config, data_dir=data_dir, root=root)
        self.stages_dir = stages_dir

    def environment(self) -> dict[str, str] | None:
        if self.stages_dir is None:
            return None
        return {**os.environ, "PYTHONPATH": str(ROOT / "bench" / "stage_cpu"),
                "BIOGATE_STAGES": ",".join(STAGES.values()), "BIOGATE_STAGES_DIR": str(self.stages_dir)}


def stage_totals(stages_dir: Path | None) -> dict[str, float]:
    """CPU seconds per stage summed over the service's processes, as last written."""
    out: dict[str, float] = {}
    for f in (stages_dir.glob("stages-*.json") if stages_dir else ()):
        for name, (cpu, _calls) in json.loads(f.read_text()).items():
            out[name] = out.get(name, 0.0) + cpu
    return out


async def verify_all(address: str, token: str, requests: list, calls: int, concurrency: int,
                     one_by_one_first: bool = False) -> dict[int, bytes]:
    """``calls`` Verify, request i % len(requests) each, ``concurrency`` at a time over as many
    connections; the serialised answer by request index (a request sent twice must answer the same).
    ``one_by_one_first``: one call on each connection in turn before, so that every worker has timed
    a Verify before calls run at once (admission refuses more than twice its slots of a kind it has
    not timed yet)."""
    md = (("authorization", f"Bearer {token}"),)
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(concurrency)]
    answers: dict[int, bytes] = {}
    try:
        for channel in channels if one_by_one_first else ():
            await face_pb2_grpc.FaceServiceStub(channel).Verify(requests[0], metadata=md, timeout=60)
        async def client(k: int) -> None:
            stub = face_pb2_grpc.FaceServiceStub(channels[k])
            for i in range(k, calls, concurrency):
                r = (await stub.Verify(requests[i % len(requests)], metadata=md, timeout=60)).SerializeToString()
                if answers.setdefault(i % len(requests), r) != r:
                    raise RuntimeError(f"request {i % len(requests)} answered differently the second time")

        await asyncio.gather(*(client(k) for k in range(concurrency)))
    finally:
        for c in channels:
            await c.close()
    return answers


def one_run(tree: Path, args, datas: list[bytes], requests: list) -> dict:
    with tempfile.TemporaryDirectory(prefix="face-overhead-") as tmp:
        stages_dir = Path(tmp) / "stages" if args.stages else None
        if stages_dir:
            stages_dir.mkdir()
        config = {"server": {"workers": args.workers}}
        svc = TreeService(tree, config, Path(tmp) / "svc", stages_dir)
        try:
            svc.start()
            channel, _stub, _md = enrol(svc, datas)
            channel.close()
            asyncio.run(verify_all(svc.address, svc.token(), requests, args.warmup, args.concurrency, one_by_one_first=True))
            time.sleep(1.5)  # the stage files written after the warm-up
            s0, cpu0, load0 = stage_totals(stages_dir), svc.cpu_seconds(), os.getloadavg()[0]
            assert svc.proc is not None
            threads = ThreadSampler([svc.proc.pid, *child_pids(svc.proc.pid)], interval_s=3600).start()
            t0 = time.perf_counter()
            answers = asyncio.run(verify_all(svc.address, svc.token(), requests, args.calls, args.concurrency))
            wall = time.perf_counter() - t0
            cpu = svc.cpu_seconds() - cpu0
            threads.stop()
            time.sleep(1.5)
            s1 = stage_totals(stages_dir)
        finally:
            svc.stop()
    return {"tree": str(tree), "cpu_ms": cpu / args.calls * 1000, "rate": args.calls / wall,
            "load": (load0, os.getloadavg()[0]), "answers": answers,
            "threads": {k: v / args.calls * 1000 for k, v in threads.cpu_by_name.items()},
            "stages": {k: (s1.get(k, 0.0) - s0.get(k, 0.0)) / args.calls * 1000 for k in s1}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="source trees, run in turn each round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mode", choices=("plain", "liveness"), default="plain")
    ap.add_argument("--stages", action="store_true", help="also the stage table (wrappers in the service)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="MODULE:QUALNAME",
                    help="more functions to time with --stages, e.g. grpc._server:_Context.send_initial_metadata")
    args = ap.parse_args()
    STAGES.update({target: target for target in args.extra})

    images, pairs = trial_pairs()
    datas = [p.read_bytes() for p in images]
    if args.mode == "plain":
        requests = plain_requests(datas, pairs, "shuffled")
    else:  # the bona fide webcam frames against one enrolled frame of them, as face_bench's liveness mode
        live = [p.read_bytes() for p in sorted((FIXTURES / "face/pad/live").glob("apfol_real_*"))]
        datas = [live[1]]
        requests = [face_pb2.VerifyFaceRequest(subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id="s0"),
                                               image=common_pb2.Image(data=d), require_liveness=True) for d in live]
    print(machine_line(), flush=True)
    runs = []
    for r in range(args.rounds):
        for tree in args.trees:
            run = one_run(tree.resolve(), args, datas, requests)
            runs.append(run)
            print(f"round {r + 1} {run['tree']}: {args.calls} Verify ({args.mode}) at concurrency {args.concurrency}, "
                  f"{args.workers} workers: service CPU {run['cpu_ms']:.2f} ms per call, {run['rate']:.1f}/s, "
                  f"load average {run['load'][0]:.1f} -> {run['load'][1]:.1f}", flush=True)
            print("    by thread (ms per call): " + ", ".join(f"{k} {v:.2f}" for k, v in run["threads"].items()
                                                             if v >= 0.01))
            for name in STAGES:
                if STAGES[name] in run["stages"]:
                    print(f"    {name:45s} {run['stages'][STAGES[name]]:7.3f} ms per call")
    first = runs[0]["answers"]
    differing = sorted({i for run in runs for i, a in run["answers"].items() if first.get(i, a) != a})
    print(f"answers: {len(first)} requests, identical in every run: {not differing}"
          + (f"; differing: {differing[:20]}" if differing else ""))
    for tree in args.trees:
        mine = [run["cpu_ms"] for run in runs if run["tree"] == str(tree.resolve())]
        print(f"{tree}: service CPU per call {' / '.join(f'{c:.2f}' for c in mine)} ms, mean {sum(mine) / len(mine):.2f}")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
