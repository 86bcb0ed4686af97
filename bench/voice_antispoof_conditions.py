"""Why genuine speech looks synthetic to AASIST: the layer's BPCER on conditions built from the
LibriSpeech fixture recordings (never the spoken digits), for the service's window (the clip as
it came: the most speech-dense window, tiled when shorter) and for a speech-only candidate (VAD
segments joined, non-speech removed, not tiled; measured here, not kept: bench/RESULTS.md).

Conditions (16 kHz fixture recording x, then the channel: wideband as is, telephone = G.711 bytes):
  recorded      x as recorded;
  pauses        x cut into 0.5 s pieces joined by 0.25 s of digital zero (and 0.25 s at each end),
                as a capture of words with silent gaps (an app's noise gate, concatenated prompts);
  short         the middle 2 s of x (shorter than the window: the old window tiled it);
  narrowband    x band-limited to 4 kHz (8 kHz and back to 16 kHz: narrowband speech in a wideband
                container, as from a Bluetooth headset); wideband only;
  nb+pauses     narrowband of ``pauses``; wideband only.
``--channel narrowband-telephone``: the two narrowband conditions as 16 kHz clips on the telephone
window (4.04 s) against the telephone threshold (--thresholds), and band-limited espeak-ng of the
odd voices (1, 3, .. 15) against it: the engine's routing of narrowband wideband clips.
``--channel narrowband-wideband``: the same on the wideband window and threshold (no routing).
Bona fide: the speakers at odd positions (the calibration's check half). Threshold per window kind:
APCER 5 % on espeak-ng voices 0, 2, .. 14 x 10 sentences (the calibration's fit voices of 16),
through the same channel. Both are fitted here, on attacks only, the same way for both kinds.
``--candidate cut``: the second window is the service's placed after digital silence is cut out
(:func:`without_digital_silence`: runs >= 20 ms within one PCM-16 step of zero; not kept on the
records as they were: bench/RESULTS.md, "Cutting digital silence before AASIST"; now the service's
voice.antispoof_cut_digital_silence, on for the telephone record refitted with it: "AASIST refitted
with the cut"), the first the same window without the
cut; give the shipped record's threshold twice (``--thresholds T T``), as the cut was to ship on the
records as they are.

``--security``: what the cut does to every presentation of the shipped records' calibration lists
(bench/voice_antispoof_eval.build, 32 espeak-ng voices; the telephone record used the first 16),
as the channel delivers them: whether the AASIST window is bit-identical with and without the cut,
and where not, both scores against the record's threshold (the check half is what the record claims).
``--sender-cut``: the check half's espeak-ng with its digital silence cut out before the channel, on
the window without the cut (what an attacker who trims espeak-ng's pauses gets from it).

    .venv/bin/python -m bench.voice_antispoof_conditions --channel wideband|telephony-8k [--out FILE.json]
    .venv/bin/python -m bench.voice_antispoof_conditions --channel wideband|telephony-8k --security [--out FILE.json]
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

from services.settings import load_config
from services.voice import antispoof, attacks, telephone
from services.voice.antispoof import SyntheticSpeechDetector
from services.voice.evaluation import _MULAW_8K
from services.voice.ingest import AudioError
from services.voice.models import VoiceModels, pipeline_from_settings
from services.common.models import ModelStore

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
WINDOW_S = {"wideband": 3.0, "telephony-8k": 4.04, "narrowband-telephone": 4.04, "narrowband-wideband": 3.0}
PIECE, GAP = 8000, 4000


FADE = 80  # 5 ms cross-fade at each join
MIN_SPEECH = 8000


def speech_only(samples: np.ndarray, segments) -> np.ndarray:
    """The candidate that was measured and not kept: the VAD segments joined with 5 ms cross-fades,
    non-speech removed (the clip itself under 0.5 s of segments)."""
    x = np.asarray(samples, dtype=np.float32)
    parts = [x[max(s, 0) : min(e, len(x))] for s, e in segments if min(e, len(x)) > max(s, 0)]
    if sum(len(p) for p in parts) < MIN_SPEECH:
        return x
    out = parts[0]
    for p in parts[1:]:
        n = min(FADE, len(out), len(p))
        if n == 0:
            continue
        r = np.linspace(0.0, 1.0, n, dtype=np.float32)
        out = np.concatenate([out[:-n], out[-n:] * (1 - r) + p[:n] * r, p[n:]])
    return out.astype(np.float32)


def speech_window(samples: np.ndarray, segments, length: int) -> np.ndarray:
    """At most ``length`` samples of :func:`speech_only` from its middle; shorter speech whole (scored
    at its own length, not tiled)."""
    speech = speech_only(samples, segments)
    if len(speech) <= length:
        return speech
    start = (len(speech) - length) // 2
    return speech[start : start + length]


clip_window = antispoof.speech_window  # the service's window before the cut: the most speech-dense, tiled when shorter


without_digital_silence = antispoof.without_digital_silence  # the cut, now voice.antispoof_cut_digital_silence


def cut_window(samples: np.ndarray, segments, length: int) -> np.ndarray:
    """The service's window placed after :func:`without_digital_silence`."""
    return antispoof.speech_window(*without_digital_silence(samples, segments), length)


RECORD_VOICES = {"wideband": 32, "telephony-8k": 16}  # espeak-ng voices of the shipped records' lists


def security(layer: SyntheticSpeechDetector, prepare, channel: str) -> dict:
    """Every presentation of the record's fit and check lists: is the window unchanged by the cut;
    where not, the scores with and without it against the record's threshold."""
    from bench.voice_antispoof_eval import build
    from services.common.evaluation.trials import read_pad
    from services.common.modality.calibration import Calibrations
    from services.voice.engine import pad_score_name

    settings = load_config()
    threshold = Calibrations(settings.models.manifest, 0.0).threshold(
        "aasist", channel, 0.05, pad_score_name(WINDOW_S[channel]))
    out = ROOT / "var" / "eval" / "voice-antispoof-32"
    build(out, attacks.VOICES[:32])
    voices = RECORD_VOICES[channel]
    report: dict = {"threshold": threshold}
    t0 = time.time()
    for part in ("check", "fit"):
        rows: dict[str, dict] = {}
        for sample in read_pad(out / f"{part}.csv", out):
            name = Path(sample.path).name
            if name.startswith("espeak-") and int(name.split("-")[1]) >= voices:
                continue
            kind = "bonafide" if sample.bonafide else str(sample.attack_type)
            row = rows.setdefault(kind, {"n": 0, "no_response": 0, "changed": [], "passed": [0, 0]})
            x, rate = sf.read(sample.path, dtype="float32")
            p = prepare(x, rate)
            if p is None:
                row["no_response"] += 1
                continue
            row["n"] += 1
            before = clip_window(p.samples, p.vad.segments, layer.window)
            after = cut_window(p.samples, p.vad.segments, layer.window)
            if np.array_equal(before, after):
                if part == "check" and kind.startswith("tts"):  # the record's APCER, identical either way
                    v = layer.score_windows([before])[0]
                    row["passed"][0] += int(v >= threshold)
                    row["passed"][1] += int(v >= threshold)
                continue
            v0, v1 = layer.score_windows([before, after])
            row["changed"].append([name, round(v0, 3), round(v1, 3)])
            row["passed"][0] += int(v0 >= threshold)
            row["passed"][1] += int(v1 >= threshold)
        report[part] = rows
        print(channel, part, json.dumps({k: {"n": v["n"], "changed": len(v["changed"]), "passed (without, with cut)":
                                             v["passed"]} for k, v in rows.items()}), f"{time.time() - t0:.0f}s",
              flush=True)
    return report


def pauses(x: np.ndarray) -> np.ndarray:
    gap = np.zeros(GAP, np.float32)
    pieces = [gap]
    for i in range(0, len(x), PIECE):
        pieces += [x[i : i + PIECE], gap]
    return np.concatenate(pieces)


narrowband = telephone.narrowband  # 8 kHz and back: narrowband speech in a 16 kHz clip


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


def sender_cut(layer: SyntheticSpeechDetector, prepare, channel: str) -> dict:
    """The records' check espeak-ng with its digital silence cut out by the sender (the same rule on
    the 16 kHz file before the channel), on the shipped window without the cut: what an attacker who
    trims espeak-ng's pauses gets today."""
    from services.common.evaluation.trials import read_pad
    from services.common.modality.calibration import Calibrations
    from services.voice.engine import pad_score_name

    settings = load_config()
    threshold = Calibrations(settings.models.manifest, 0.0).threshold(
        "aasist", channel, 0.05, pad_score_name(WINDOW_S[channel]))
    out = ROOT / "var" / "eval" / "voice-antispoof-32"
    scores: list[float] = []
    t0 = time.time()
    for sample in read_pad(out / "check.csv", out):
        name = Path(sample.path).name
        if not name.startswith("espeak-") or int(name.split("-")[1]) >= RECORD_VOICES[channel]:
            continue
        x, rate = sf.read(sample.path, dtype="float32")
        p = prepare(without_digital_silence(x, ())[0], rate)
        if p is not None:
            scores.append(layer.score_windows([clip_window(p.samples, p.vad.segments, layer.window)])[0])
    passed = int(np.sum(np.asarray(scores) >= threshold))
    print(channel, f"sender-cut espeak-ng passing {threshold:.3f}: {passed} / {len(scores)}",
          f"median {np.median(scores):.2f}", f"{time.time() - t0:.0f}s", flush=True)
    return {"threshold": threshold, "passed": [passed, len(scores)], "scores": [round(v, 3) for v in scores]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channel", choices=list(WINDOW_S), default="wideband")
    ap.add_argument("--out")
    ap.add_argument("--thresholds", type=float, nargs=2, metavar=("CLIP", "SPEECH"),
                    help="the two thresholds of an earlier run (its espeak-ng scoring is then skipped)")
    ap.add_argument("--every", type=int, default=1, help="every n-th bona fide recording (CPU time)")
    ap.add_argument("--candidate", choices=("speech", "cut"), default="speech", help="the second window")
    ap.add_argument("--security", action="store_true", help="the cut on the shipped records' lists")
    ap.add_argument("--sender-cut", action="store_true", help="check espeak-ng trimmed by the sender, window uncut")
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
    routed = a.channel.startswith("narrowband-")  # 16 kHz narrowband clips on that channel's window

    def prepare(x: np.ndarray, rate: int = 16000):
        try:
            if tel:
                return pipeline.prepare(telephone.encode(x, rate), _MULAW_8K, "verify")
            return pipeline.prepare_samples(x, rate, "verify")
        except AudioError:
            return None

    if a.security or a.sender_cut:
        report = (security if a.security else sender_cut)(layer, prepare, a.channel)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(report, indent=1))
        return 0
    candidate = cut_window if a.candidate == "cut" else speech_window

    def scores(x: np.ndarray) -> dict[str, float] | None:
        p = prepare(x)
        if p is None:
            return None
        clip = layer.score_windows([clip_window(p.samples, p.vad.segments, layer.window)])[0]
        if routed:  # the candidate was dropped before this condition was added
            return {"clip": clip, "speech": clip}
        window = candidate(p.samples, p.vad.segments, layer.window)
        if a.candidate == "cut" and np.array_equal(window, clip_window(p.samples, p.vad.segments, layer.window)):
            return {"clip": clip, "speech": clip}
        return {"clip": clip, "speech": layer.score_windows([window])[0]}

    t0 = time.time()
    attack: dict[str, list[float]] = {"clip": [], "speech": []}
    for j, voice in enumerate([] if a.thresholds or routed else attacks.VOICES[:16:2]):
        for text in attacks.SENTENCES:
            s = scores(attacks.espeak(text, voice, speed=140 + 10 * ((2 * j) % 4)))
            if s:
                for k in attack:
                    attack[k].append(s[k])
    if routed:  # the telephone threshold on band-limited espeak-ng of the voices it was not fitted on
        for j, voice in enumerate(attacks.VOICES[1:16:2]):
            for text in attacks.SENTENCES:
                s = scores(narrowband(attacks.espeak(text, voice, speed=140 + 10 * ((2 * j + 1) % 4))))
                if s:
                    attack["clip"].append(s["clip"])
        print(f"narrowband espeak-ng passing the threshold {a.thresholds[0]}:",
              int(np.sum(np.asarray(attack["clip"]) >= a.thresholds[0])), "/", len(attack["clip"]), flush=True)
    thresholds = dict(zip(attack, a.thresholds, strict=True)) if a.thresholds else {k: apcer_threshold(v) for k, v in attack.items()}
    print(a.channel, "attacks", len(attack["clip"]), "thresholds", thresholds, f"{time.time() - t0:.0f}s", flush=True)
    files = sorted((FIXTURES / "voice" / "verification").glob("*/*.wav"))
    speakers = sorted({f.parent.name for f in files})
    odd = set(speakers[1::2])
    files = [f for f in files if f.parent.name in odd][:: a.every]
    conditions = [c for c in CONDITIONS if c.startswith("n")] if routed else [
        c for c in CONDITIONS if not (tel and c.startswith("n"))]
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
            rows[c][k] = {"bpcer": [refused, len(v)], "median": round(float(np.median(v)), 2),
                          "scores": [round(float(x), 3) for x in v]}
        print(a.channel, c, json.dumps({k: (v if not isinstance(v, dict) else {"bpcer": v["bpcer"], "median": v["median"]})
                                        for k, v in rows[c].items()}), f"{time.time() - t0:.0f}s", flush=True)
    report = {"channel": a.channel, "window_s": WINDOW_S[a.channel], "candidate": a.candidate, "thresholds": thresholds,
              "attacks": len(attack["clip"]), "attack_scores": {k: [round(float(x), 3) for x in v] for k, v in attack.items()}, "attack_median": {k: round(float(np.median(v)), 2) for k, v in attack.items() if v},
              "conditions": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
