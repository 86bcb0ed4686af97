"""Where a service's busy threads spend their time: py-spy's raw (collapsed) stacks sorted into the
models' own runs and everything around them (decode, pre/post-processing, gRPC, storage, ...).

    .venv/bin/pip install py-spy      # not a dependency of the project
    .venv/bin/py-spy record --pid PID --duration 15 --rate 50 --format raw --threads --nonblocking -o stacks.txt
    .venv/bin/python -m bench.profile_stacks stacks.txt

py-spy leaves out threads it finds idle; stacks that end waiting (a lock, a queue, a condition,
select) are left out here too, so the shares are of the samples that were working. A stack is
counted under the first rule that matches it from the innermost frame outwards.
"""

from __future__ import annotations

import argparse
import collections
import sys

MODEL_RUN = ("Session.run (onnxruntime", "(torch/nn/")  # an onnxruntime or torch model's own run
MODELS = (("yunet.py", "detector"), ("scrfd.py", "detector"), ("arcface.py", "embedder"), ("sface.py", "embedder"),
          ("embedding.py", "embedder"), ("liveness.py", "liveness"), ("ecapa", "speaker embedder"),
          ("aasist", "anti-spoofing"), ("vad", "VAD"))
AROUND = (
    ("letterbox", "detector pre-processing (letterbox)"),
    ("yunet.py", "detector pre/post-processing (canvas stack, decode, NMS)"),
    ("detection.py", "detector pre/post-processing (canvas stack, decode, NMS)"),
    ("imaging.py", "image decode (Pillow, bounds, EXIF)"),
    ("align.py", "alignment"),
    ("quality.py", "quality gates"),
    ("subject.py", "subject choice"),
    ("liveness.py", "liveness crops"),
    ("digits.py", "spoken-digit check (log-mel, recogniser)"),
    ("replay.py", "replay fingerprint"),
    ("voice/audio", "audio decode and resampling"),
    ("audit", "audit record"),
    ("templates.py", "template read + decrypt"),
    ("crypto", "template read + decrypt"),
    ("storage", "storage"),
    ("calibration", "calibration look-ups"),
    ("interceptor.py", "interceptor (auth, metrics, logs)"),
    ("admission.py", "admission control"),
    ("auth.py", "interceptor (auth, metrics, logs)"),
    ("batching.py", "micro-batcher hand-offs"),
    ("_pb2", "protobuf"),
    ("protobuf", "protobuf"),
    ("grpc", "gRPC Python server"),
    ("prometheus_client", "metrics"),
)
WAITING = ("wait (threading", "_wait_for_tstate_lock", "select (selectors", "get (queue", "acquire (", "sleep (",
           "serve_forever", "_poll_connectivity", "result (concurrent")


def category(frames: list[str]) -> str:
    inner_first = frames[::-1]
    if any(m in f for f in inner_first for m in MODEL_RUN):
        for f in inner_first:
            for key, name in MODELS:
                if key in f.lower():
                    return f"model run: {name}"
        return "model run: other"
    for f in inner_first:
        for key, name in AROUND:
            if key in f:
                return name
    return "other (" + (inner_first[0].split(" (")[0] if inner_first else "no Python frame") + ")"


def breakdown(lines) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for line in lines:
        line = line.rstrip()
        if not line or " " not in line:
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")[1:]  # the first is the thread
        if any(w in f for f in frames[-1:] for w in WAITING):
            continue
        out[category(frames)] += int(count)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stacks", nargs="+", help="py-spy --format raw files")
    args = ap.parse_args()
    for path in args.stacks:
        with open(path) as fh:
            counts = breakdown(fh)
        total = sum(counts.values()) or 1
        print(f"{path}: {total} working samples")
        for name, n in counts.most_common():
            print(f"  {100 * n / total:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
