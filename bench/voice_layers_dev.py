"""Measurements behind the voice service's anti-spoofing layers (printed as JSON lines).

    .venv/bin/python bench/voice_layers_dev.py [--digits 40] [--skip-replay]

* digits: PocketSphinx digit-grammar accuracy (whole 6-digit strings, and per digit) on espeak-ng
  speech (several voices) as recorded and through the telephone simulation; and on the real
  TIDIGITS recording of the pocketsphinx sdist, when the cohort download has put it in the cache.
* replay: fingerprint similarity between different fixture captures (all pairs; same speaker
  included) and between a capture and its re-encoded / resampled / loudspeaker+room copies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.voice import attacks, replay, telephone  # noqa: E402
from services.voice.digits import WORDS, DigitRecognizer  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "voice" / "verification"
VOICES = ("en-us", "en-us+klatt", "en-us+klatt2", "en-us+f3", "en+m2", "en-us+m3")


def tel(x: np.ndarray) -> np.ndarray:
    return attacks.resample(telephone.decode(telephone.encode(x)), 8000, 16000)


def digits_bench(n: int) -> None:
    rec = DigitRecognizer()
    rng = np.random.default_rng(1)
    for voice in VOICES:
        stats = {"wideband": [0, 0], "telephone": [0, 0]}
        t = time.perf_counter()
        for _ in range(n):
            digits = "".join(str(d) for d in rng.integers(0, 10, 6))
            x = attacks.espeak(" ".join(WORDS[int(d)] for d in digits), voice, speed=130, gap=8)
            for channel, y in (("wideband", x), ("telephone", tel(x))):
                got = rec.recognise(y, 6)
                stats[channel][0] += got == digits
                stats[channel][1] += sum(a == b for a, b in zip(got, digits))
        ms = 1000 * (time.perf_counter() - t) / (2 * n)
        print(json.dumps({"layer": "digits", "voice": voice, "utterances": n, "ms_per_utterance": round(ms),
                          **{f"{c}_string_acc": round(v[0] / n, 3) for c, v in stats.items()},
                          **{f"{c}_digit_acc": round(v[1] / (6 * n), 3) for c, v in stats.items()}}), flush=True)
    archives = sorted((ROOT / "var" / "models" / ".downloads" / "pypi-sdist").glob("*/*.tar.gz"))
    if archives:
        with tarfile.open(archives[0]) as tf:
            prefix = tf.getnames()[0].split("/")[0]
            raw = tf.extractfile(f"{prefix}/test/data/tidigits/dhd.2934z.raw").read()
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
        print(json.dumps({"layer": "digits", "voice": "TIDIGITS dhd.2934z (real)", "truth": "29340",
                          "wideband": rec.recognise(x, 5), "telephone": rec.recognise(tel(x), 5)}), flush=True)


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
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits", type=int, default=20)
    ap.add_argument("--skip-replay", action="store_true")
    args = ap.parse_args()
    digits_bench(args.digits)
    if not args.skip_replay:
        replay_bench()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
