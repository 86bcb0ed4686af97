"""AASIST / AASIST-L scores on genuine fixture speech (as recorded and through the telephone
simulation) and on espeak-ng speech (needs `apt-get install espeak-ng`).

    .venv/bin/python -m bench.voice_antispoof_dev [--out FILE.json]

Scores are bona fide log-odds (higher = genuine). Reports, per model and channel, the score
distribution, the false rejections of genuine speech at the threshold that rejects every espeak
sample, and the PAD EER.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf


from services.common.config import PROJECT_ROOT
from services.settings import load_config
from services.common.evaluation import metrics
from services.common.models import ModelStore
from services.voice import attacks, telephone
from services.voice.aasist import AasistDetector

FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
SENTENCES = attacks.SENTENCES[:8]
VOICES = attacks.VOICES[:5]


def espeak_clips() -> list[np.ndarray]:
    return [attacks.espeak(text, VOICES[i % len(VOICES)]) for i, text in enumerate(SENTENCES)]


def summary(scores: list[float]) -> dict:
    a = np.asarray(scores)
    return {"n": len(a), "min": round(float(a.min()), 3), "median": round(float(np.median(a)), 3),
            "max": round(float(a.max()), 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--limit", type=int, default=0, help="genuine files to score (0 = all)")
    args = ap.parse_args()
    store = ModelStore(load_config())
    models = {
        "aasist": (store.path("aasist", "AASIST.pth"), store.path("aasist", "AASIST_config.json")),
        "aasist-l": (store.path("aasist-l", "AASIST-L.pth"), store.path("aasist-l", "AASIST-L.conf")),
    }
    genuine_files = sorted((FIXTURES / "voice" / "verification").glob("*/*.wav"))
    if args.limit:
        genuine_files = genuine_files[:: max(1, len(genuine_files) // args.limit)]
    genuine = [sf.read(f, dtype="float32")[0] for f in genuine_files]
    synthetic = espeak_clips()
    report: dict = {}
    for name, (weights, conf) in models.items():
        det = AasistDetector(weights, conf)
        for channel in ("wideband", "telephony-8k"):
            def prep(x, channel=channel):
                return telephone.simulate(x) if channel == "telephony-8k" else x
            t = time.perf_counter()
            g = [det.score(prep(x)) for x in genuine]
            per_clip = (time.perf_counter() - t) / len(genuine)
            s = [det.score(prep(x)) for x in synthetic]
            threshold = max(s) + 1e-6  # rejects every espeak sample
            frr = float(np.mean(np.asarray(g) < threshold))
            eer = metrics.pad_eer(g, {"tts_espeak": s})
            r = {"genuine": summary(g), "espeak": summary(s), "frr_at_zero_espeak_accept": round(frr, 4),
                 "pad_eer": round(eer.eer, 4), "eer_threshold": round(float(eer.threshold), 3),
                 "ms_per_clip": round(1000 * per_clip, 1)}
            report[f"{name}/{channel}"] = r
            print(name, channel, json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
