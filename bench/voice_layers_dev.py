"""Measurements behind the voice service's anti-spoofing layers (printed as JSON lines).

    .venv/bin/python -m bench.voice_layers_dev

* replay: fingerprint similarity between different fixture captures (all pairs; same speaker
  included) and between a capture and its re-encoded / resampled / loudspeaker+room copies.

(The digit recogniser is measured on real speech by bench/voice_digits.py.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from services.voice import attacks, replay, telephone

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = ROOT.parent / "shared" / "fixtures" / "voice" / "verification"


def tel(x: np.ndarray) -> np.ndarray:
    return attacks.resample(telephone.decode(telephone.encode(x)), 8000, 16000)


def replay_bench() -> None:
    files = sorted(FIXTURES.glob("*/*.wav"))
    xs = [sf.read(f, dtype="float32")[0] for f in files]
    t = time.perf_counter()
    fps = [replay.fingerprint(x) for x in xs]
    fp_ms = 1000 * (time.perf_counter() - t) / len(xs)
    t = time.perf_counter()
    diff = [replay.similarity(fps[i], fps[j]) for i in range(len(xs)) for j in range(i + 1, len(xs))]
    sim_ms = 1000 * (time.perf_counter() - t) / len(diff)
    print(json.dumps({"layer": "replay", "case": "different captures (all pairs)", "n": len(diff),
                      "max": round(max(diff), 3), "p99": round(float(np.percentile(diff, 99)), 3),
                      "fingerprint_ms": round(fp_ms, 1), "compare_ms": round(sim_ms, 2)}), flush=True)
    cases = {
        "G.711 mu-law round trip": tel,
        "resampled 16k-44.1k-16k": lambda x: attacks.resample(attacks.resample(x, 16000, 44100), 44100, 16000),
        "loudspeaker+room RT60 0.3 s, SNR 20 dB, then G.711": lambda x: tel(attacks.loudspeaker_room(x, 16000, 0.3, 20, 1)),
        "loudspeaker+room RT60 0.5 s, SNR 15 dB, then G.711": lambda x: tel(attacks.loudspeaker_room(x, 16000, 0.5, 15, 2)),
        "last two thirds, room RT60 0.3 s, then G.711": lambda x: tel(attacks.loudspeaker_room(x[len(x) // 3 :], 16000, 0.3, 20, 3)),
    }
    threshold = 0.55
    for name, fn in cases.items():
        s = [replay.similarity(replay.fingerprint(fn(x)), fp) for x, fp in zip(xs, fps)]
        print(json.dumps({"layer": "replay", "case": name, "n": len(s), "min": round(min(s), 3),
                          "median": round(float(np.median(s)), 3),
                          "detected_at_0.55": round(float(np.mean(np.asarray(s) >= threshold)), 3)}), flush=True)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    replay_bench()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
