"""Why genuine speech looks synthetic to AASIST: the layer's BPCER on conditions built from the
LibriSpeech fixture recordings (never the spoken digits), for the window the layer scored before
(the clip as it came: the most speech-dense window, tiled when shorter) and for the speech-only
window (services/voice/antispoof.py: VAD segments joined, non-speech removed, not tiled).

Conditions (16 kHz fixture recording x, then the channel: wideband as is, telephone = G.711 bytes):
  recorded      x as recorded;
  pauses        x cut into 0.5 s pieces joined by 0.25 s of digital zero (and 0.25 s at each end),
                as a capture of words with silent gaps (an app's noise gate, concatenated prompts);
  short         the middle 2 s of x (shorter than the window: the old window tiled it);
  narrowband    x band-limited to 4 kHz (8 kHz and back to 16 kHz: narrowband speech in a wideband
                container, as from a Bluetooth headset); wideband only;
  nb+pauses     narrowband of ``pauses``; wideband only.
Bona fide: the speakers at odd positions (the calibration's check half). Threshold per window kind:
APCER 5 % on espeak-ng voices 0, 2, .. 14 x 10 sentences (the calibration's fit voices of 16),
through the same channel. Both are fitted here, on attacks only, the same way for both kinds.

    .venv/bin/python -m bench.voice_antispoof_conditions --channel wideband|telephony-8k [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from services.settings import load_config
from services.voice import attacks, telephone
from services.voice.antispoof import SyntheticSpeechDetector, speech_window
from services.voice.evaluation import _MULAW_8K
from services.voice.ingest import AudioError
from services.voice.models import VoiceModels, pipeline_from_settings
from services.common.models import ModelStore

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
WINDOW_S = {"wideband": 3.0, "telephony-8k": 4.04}
PIECE, GAP = 8000, 4000


def clip_window(samples: np.ndarray, segments, length: int) -> np.ndarray:
    """The window the layer scored before: the ``length``-sample window holding the most VAD speech,
    the clip tiled when shorter (services/voice/antispoof.py before this change)."""
    x = np.asarray(samples, dtype=np.float32)
    if len(x) <= length:
        return np.tile(x, length // max(len(x), 1) + 1)[:length]
    mask = np.zeros(len(x) + 1, np.int64)
    for start, end in segments:
        mask[max(start, 0)] += 1
        mask[min(end, len(x))] -= 1
    speech = np.cumsum(mask[:-1]) > 0
    csum = np.concatenate([[0], np.cumsum(speech)])
    covered = csum[length:] - csum[: len(x) - length + 1]
    best = np.flatnonzero(covered == covered.max())
    start = int(best[len(best) // 2])
    return x[start : start + length]


def pauses(x: np.ndarray) -> np.ndarray:
    gap = np.zeros(GAP, np.float32)
    pieces = [gap]
    for i in range(0, len(x), PIECE):
        pieces += [x[i : i + PIECE], gap]
    return np.concatenate(pieces)


def narrowband(x: np.ndarray) -> np.ndarray:
    return soxr.resample(soxr.resample(x, 16000, 8000, quality="HQ"), 8000, 16000, quality="HQ").astype(np.float32)


def short(x: np.ndarray) -> np.ndarray:
    start = max(0, (len(x) - 32000) // 2)
    return x[start : start + 32000]


CONDITIONS = {
    "recorded": lambda x: x,
    "pauses": pauses,
    "short": short,
    "narrowband": narrowband,
    "nb+pauses": lambda x: narrowband(pauses(x)),
}


def apcer_threshold(attack: list[float], apcer: float = 0.05) -> float:
    """The lowest threshold that lets at most ``apcer`` of the attacks through (score >= threshold)."""
    s = np.sort(np.asarray(attack))[::-1]
    k = int(np.floor(apcer * len(s)))
    return float(s[k]) + 1e-6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channel", choices=list(WINDOW_S), default="wideband")
    ap.add_argument("--out")
    ap.add_argument("--thresholds", type=float, nargs=2, metavar=("CLIP", "SPEECH"),
                    help="the two thresholds of an earlier run (its espeak-ng scoring is then skipped)")
    ap.add_argument("--every", type=int, default=1, help="every n-th bona fide recording (CPU time)")
    a = ap.parse_args()
    os.environ.setdefault("BIOGATE_LOGGING__LEVEL", "WARNING")
    settings = load_config()
    store = ModelStore(settings)
    models = VoiceModels.choose(store.manifest, settings.voice)
    det = models.antispoof_detector(store, threads=1, device="cpu")
    assert det is not None
    layer = SyntheticSpeechDetector(det, WINDOW_S[a.channel])
    pipeline = pipeline_from_settings(settings)
    tel = a.channel == "telephony-8k"

    def prepare(x: np.ndarray):
        try:
            if tel:
                return pipeline.prepare(telephone.encode(x, 16000), _MULAW_8K, "verify")
            return pipeline.prepare_samples(x, 16000, "verify")
        except AudioError:
            return None

    def scores(x: np.ndarray) -> dict[str, float] | None:
        p = prepare(x)
        if p is None:
            return None
        return {"clip": layer.score_windows([clip_window(p.samples, p.vad.segments, layer.window)])[0],
                "speech": layer.score_windows([speech_window(p.samples, p.vad.segments, layer.window)])[0]}

    t0 = time.time()
    attack: dict[str, list[float]] = {"clip": [], "speech": []}
    for j, voice in enumerate([] if a.thresholds else attacks.VOICES[:16:2]):
        for text in attacks.SENTENCES:
            s = scores(attacks.espeak(text, voice, speed=140 + 10 * ((2 * j) % 4)))
            if s:
                for k in attack:
                    attack[k].append(s[k])
    thresholds = dict(zip(attack, a.thresholds)) if a.thresholds else {k: apcer_threshold(v) for k, v in attack.items()}
    print(a.channel, "attacks", len(attack["clip"]), "thresholds", thresholds, f"{time.time() - t0:.0f}s", flush=True)
    files = sorted((FIXTURES / "voice" / "verification").glob("*/*.wav"))
    speakers = sorted({f.parent.name for f in files})
    odd = set(speakers[1::2])
    files = [f for f in files if f.parent.name in odd][:: a.every]
    conditions = [c for c in CONDITIONS if not (tel and c.startswith("n"))]
    rows: dict[str, dict] = {}
    for c in conditions:
        got: dict[str, list[float]] = {"clip": [], "speech": []}
        missing = 0
        for f in files:
            x, rate = sf.read(f, dtype="float32")
            s = scores(CONDITIONS[c](x))
            if s is None:
                missing += 1
                continue
            for k in got:
                got[k].append(s[k])
        rows[c] = {"n": len(got["clip"]), "no_response": missing}
        for k, v in got.items():
            refused = int(np.sum(np.asarray(v) < thresholds[k]))
            rows[c][k] = {"bpcer": [refused, len(v)], "median": round(float(np.median(v)), 2)}
        print(a.channel, c, json.dumps(rows[c]), f"{time.time() - t0:.0f}s", flush=True)
    report = {"channel": a.channel, "window_s": WINDOW_S[a.channel], "thresholds": thresholds,
              "attacks": len(attack["clip"]), "attack_median": {k: round(float(np.median(v)), 2) for k, v in attack.items() if v},
              "conditions": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
