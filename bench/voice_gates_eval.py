"""Voice gates chosen by generalisation: the VAD's level normalisation and the net-speech minimums,
each fitted on one part of the fixtures and measured on the other (the speakers at even / odd
positions of the sorted names, 6 and 6), against the untuned default.

1. VAD on quiet and far-field speech: the 112 fixture recordings as recorded, attenuated by 20 and
   30 dB, reverberated (a synthetic room, RT60 0.6 s, then -20 dB and noise at 20 dB SNR), and their
   middle 3 s through the telephone simulation (G.711 mu-law, as the IVR delivers them): net
   speech and the share failing the verify minimum (one recording as a probe) and the enrolment
   minimum (one recording as a whole enrolment), without normalisation (the default before) and
   with each (target level, maximum gain) of a small grid. The grid point is chosen on the even
   speakers' attenuated and reverberated recordings and measured on the odd speakers'.
2. Net-speech minimums from the EER against duration: all pairs of the 112 recordings (wideband),
   the probe cut to its first N s of net speech (enrolment whole), and the enrolment cut to M s
   against probes cut to the verify minimum: EER, and FNMR / FMR at the service's calibrated
   threshold. The minimum is the
   shortest duration (with every longer one) whose FMR at the threshold stays within the
   full-length FMR's 95 % upper bound and whose EER is within 1 point of the full-length EER, on
   the even speakers; checked on the odd ones. A shorter clip's FNMR at the threshold is higher,
   but below the minimum the user fails for certain (refused), above it only sometimes: the
   minimum is where the comparison stops holding (EER) or false matches start, not where FNMR rises.

    .venv/bin/python -m bench.voice_gates_eval [--out var/eval/voice-gates] [--skip vad|duration]

Writes ``results.json`` in --out; the tables are in bench/RESULTS.md ("Voice gates").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve

from bench.eval_common import write_results
from services.settings import load_config
from services.common.evaluation import metrics as m
from services.common.evaluation.trials import read_pad
from services.common.models import ModelStore
from services.voice.attacks import room_impulse_response
from services.voice import telephone
from services.voice.ingest import AudioFormat, Conditioner, Encoding, decode
from services.voice.models import VoiceModels, pipeline_from_settings
from services.voice.vad import SileroVad, VadParams

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = ROOT.parent / "shared" / "fixtures"
# (target dBFS, max gain dB, release dB/s, as_is_too); the last: the shipped setting since the
# isolated-digit study (section "Voice: VAD on short isolated words" of bench/RESULTS.md)
GRID: tuple[tuple[float | None, float, float, bool], ...] = ((None, 0.0, 6.0, False), (-26.0, 20.0, 6.0, False), (-26.0, 30.0, 6.0, False), (-20.0, 30.0, 6.0, False),
        (-26.0, 40.0, 6.0, False), (-20.0, 20.0, 1.0, False), (-26.0, 20.0, 0.0, False), (-20.0, 30.0, 6.0, True))
DIGITS = FIXTURES / "voice" / "digits"
PROBE_S = (0.5, 1.0, 1.5, 2.0, 3.0)
ENROL_S = (1.0, 1.5, 2.0, 3.0, 4.0)


def far_field(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = fftconvolve(x, room_impulse_response(16000, 0.6, rng))[: len(x)]
    y *= np.sqrt(np.mean(x**2) / max(np.mean(y**2), 1e-12)) * 10 ** (-20 / 20)
    noise = rng.standard_normal(len(y)) * np.sqrt(np.mean(y**2) / 10 ** (20 / 10))
    return (y + noise).astype(np.float32)


def telephone_3s(x: np.ndarray) -> np.ndarray:
    """The middle 3 s through the telephone simulation, as the IVR delivers it, back at 16 kHz."""
    n = 3 * 16000
    data = telephone.encode(x[max(0, (len(x) - n) // 2):][:n], 16000)
    d = decode(data, AudioFormat(Encoding.MULAW, 8000))
    c = Conditioner(d.sample_rate, d.full_scale)
    return np.concatenate([c.push(d.samples), c.finish()])


def noise_only(x: np.ndarray, seed: int) -> np.ndarray:
    """The far-field condition's noise alone (no speech): what a detector finds here is false speech."""
    rng = np.random.default_rng(seed)
    level = np.sqrt(np.mean(x**2)) * 10 ** (-20 / 20) / 10 ** (20 / 20)
    return (rng.standard_normal(len(x)) * level).astype(np.float32)


def conditions(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    return {"clean": conditioned(x), "-20 dB": conditioned(x * 0.1), "-30 dB": conditioned(x * 10 ** (-1.5)),
            "far field": conditioned(far_field(x, seed)), "telephone 3 s": telephone_3s(x),
            "noise only": conditioned(noise_only(x, seed))}


def isolated_words() -> dict[str, np.ndarray]:
    """A second source, never used to choose: each isolated spoken-digit take (8 kHz) between
    0.25 s pauses, through the ingest conditioner as the service receives it."""
    out = {}
    for f in sorted(DIGITS.glob("*.wav")):
        x, rate = sf.read(f, dtype="float32")
        pause = np.zeros(rate // 4, np.float32)
        d = np.concatenate([pause, x, pause])
        c = Conditioner(rate)
        out[f.stem] = np.concatenate([c.push(d), c.finish()])
    return out


def conditioned(x: np.ndarray) -> np.ndarray:
    c = Conditioner(16000)
    return np.concatenate([c.push(x), c.finish()])


def speakers(files: list[Path]) -> tuple[set[str], set[str]]:
    names = sorted({f.parent.name for f in files})
    return set(names[0::2]), set(names[1::2])


def vad_study(vad_path: Path, files: list[Path], audio: dict[Path, np.ndarray], cfg,
              grid: list[tuple[float | None, float, float, bool]]) -> dict[str, Any]:
    even, odd = speakers(files)
    out: dict[str, Any] = {}
    words = isolated_words()
    for target, gain, release, as_is_too in grid:
        name = "off" if target is None else f"{target:g} dBFS, max +{gain:g} dB, release {release:g} dB/s" + (
            ", or as is" if as_is_too else "")
        vad = SileroVad(vad_path, VadParams(level_target_dbfs=target, max_gain_db=gain, release_db_per_s=release,
                                            as_is_too=as_is_too))
        rows: dict[str, list[tuple[str, float]]] = {}
        for i, f in enumerate(files):
            for cond, x in conditions(audio[f], i).items():
                rows.setdefault(cond, []).append((f.parent.name, vad(x).speech_s))
        res = {}
        heard = np.array([vad(x).speech_s for x in words.values()])
        res["isolated digits (check)"] = {"n": int(heard.size), "median_net_speech_s": round(float(np.median(heard)), 2),
                                          "no_speech": int(np.count_nonzero(heard == 0.0))}
        for cond, vals in rows.items():
            for part, who in (("even", even), ("odd", odd)):
                s = np.array([v for spk, v in vals if spk in who])
                if cond == "noise only":
                    res[f"{cond}|{part}"] = {"n": int(s.size), "false_speech_s_total": round(float(s.sum()), 2),
                                             "clips_with_speech": int(np.count_nonzero(s > 0))}
                    continue
                res[f"{cond}|{part}"] = {
                    "n": int(s.size), "median_net_speech_s": round(float(np.median(s)), 2),
                    "fail_verify": int(np.count_nonzero(s < cfg.min_net_speech_verify_s)),
                    "fail_enrol_one": int(np.count_nonzero(s < max(cfg.min_total_net_speech_enroll_s,
                                                                   cfg.min_net_speech_enroll_s)))}
        out[name] = res
        print(name, json.dumps(res), flush=True)
    return out


def cut_to_net_speech(x: np.ndarray, segments, seconds: float) -> np.ndarray | None:
    """The clip up to where its speech segments add up to ``seconds`` (None: it holds less)."""
    need = int(seconds * 16000)
    for s, e in segments:
        if e - s >= need:
            return x[: s + need]
        need -= e - s
    return None


def duration_study(settings, files: list[Path], audio: dict[Path, np.ndarray]) -> dict[str, Any]:
    pipeline = pipeline_from_settings(settings, providers=("CPUExecutionProvider",))
    store = ModelStore(settings)
    record = store.model(VoiceModels.choose(store.manifest, settings.voice).embedder.id).calibration["wideband"]
    threshold = record.threshold(settings.voice.target_fmr)
    even, _ = speakers(files)
    prepared = {f: conditioned(audio[f]) for f in files}
    segments = {f: pipeline.vad(prepared[f]).segments for f in files}

    def embed(x: np.ndarray) -> np.ndarray:
        return pipeline.embedder.embed_batch([x])[0]

    def unit(e: np.ndarray) -> np.ndarray:
        return e / np.linalg.norm(e)

    cuts: dict[float | None, dict[Path, np.ndarray]] = {None: {f: unit(embed(prepared[f])) for f in files}}
    for n in sorted(set(PROBE_S) | set(ENROL_S)):
        cuts[n] = {}
        for f in files:
            y = cut_to_net_speech(prepared[f], segments[f], n)
            if y is not None:
                cuts[n][f] = unit(embed(y))
    verify_min = settings.voice.min_net_speech_verify_s
    out: dict[str, Any] = {"threshold": threshold, "enrol_probes_cut_to_s": verify_min}
    # probe n: enrolment whole, probe cut; enrol m: enrolment cut, probe cut to the verify minimum.
    combos = [(f"probe {'full' if n is None else f'{n:g} s'}", cuts[None], cuts[n]) for n in (*PROBE_S, None)]
    combos += [(f"enrol {'full' if n is None else f'{n:g} s'}", cuts[n], cuts[verify_min]) for n in (*ENROL_S, None)]
    for key, enrolled_set, probe_set in combos:
        res = {}
        for part in ("even", "odd"):
            gen: list[float] = []
            imp: list[float] = []
            for a in files:
                for b in files:
                    if a == b or (a.parent.name in even) != (part == "even") or \
                            (b.parent.name in even) != (part == "even"):
                        continue
                    enrolled, probe = enrolled_set.get(a), probe_set.get(b)
                    if enrolled is None or probe is None:
                        continue
                    (gen if a.parent.name == b.parent.name else imp).append(float(enrolled @ probe))
            g, i = np.asarray(gen), np.asarray(imp)
            r = m.error_rates(g, i, threshold)
            fm = int(round(r.fmr * i.size))
            res[part] = {"genuine": int(g.size), "impostor": int(i.size), "eer": m.eer(g, i).eer,
                         "fnmr": r.fnmr, "fmr": r.fmr, "false_matches": fm,
                         "fmr_upper95": m.binomial_ci(fm, int(i.size))[1]}
        out[key] = res
        print(key, json.dumps(res), flush=True)
    # Several short utterances summed: the template is the mean of k recordings' embeddings, each
    # cut to 4/k s (4 s of net speech in all), against probes cut to the verify minimum.
    by_speaker: dict[str, list[Path]] = {}
    for f in files:
        by_speaker.setdefault(f.parent.name, []).append(f)
    for k, each in ((1, 4.0), (2, 2.0), (4, 1.0)):
        res = {}
        for part in ("even", "odd"):
            gen, imp = [], []
            for spk, own in by_speaker.items():
                if (spk in even) != (part == "even"):
                    continue
                for start in range(0, len(own) - k + 1, k):
                    group = own[start:start + k]
                    if any(f not in cuts[each] for f in group):
                        continue
                    t = unit(np.mean([cuts[each][f] for f in group], axis=0))
                    for b in files:
                        if b in group or (b.parent.name in even) != (part == "even") or b not in cuts[verify_min]:
                            continue
                        (gen if b.parent.name == spk else imp).append(float(t @ cuts[verify_min][b]))
            g, i = np.asarray(gen), np.asarray(imp)
            r = m.error_rates(g, i, threshold)
            res[part] = {"genuine": int(g.size), "impostor": int(i.size), "eer": m.eer(g, i).eer, "fnmr": r.fnmr,
                         "fmr": r.fmr}
        out[f"enrol {k} x {each:g} s"] = res
        print(f"enrol {k} x {each:g} s", json.dumps(res), flush=True)
    return choose_minimums(out)


def choose_minimums(out: dict[str, Any], max_eer_rise: float = 0.01) -> dict[str, Any]:
    for side, lengths in (("probe", PROBE_S), ("enrol", ENROL_S)):
        ref = out[f"{side} full"]["even"]
        ok = [n for n in lengths if out[f"{side} {n:g} s"]["even"]["fmr"] <= ref["fmr_upper95"]
              and out[f"{side} {n:g} s"]["even"]["eer"] <= ref["eer"] + max_eer_rise]
        chosen = next((n for n in sorted(ok) if all(x in ok for x in lengths if x >= n)), max(lengths))
        out[f"{side}_minimum_chosen_on_even"] = chosen
        out[f"{side}_minimum_check_on_odd"] = out[f"{side} {chosen:g} s"]["odd"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "var" / "eval" / "voice-gates"))
    ap.add_argument("--skip", nargs="*", default=(), choices=("vad", "duration"))
    ap.add_argument("--grid", type=int, nargs="*", help="VAD study: only these GRID rows (indices)")
    a = ap.parse_args()
    os.environ.setdefault("BIOGATE_MODELS__CACHE_DIR", str(ROOT / "var" / "models"))
    settings = load_config()
    files = [s.path for s in read_pad(FIXTURES / "pad_voice.csv", FIXTURES) if s.bonafide]
    audio = {}
    for f in files:
        x, rate = sf.read(f, dtype="float32", always_2d=True)
        assert rate == 16000, f
        audio[f] = x.mean(axis=1)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "recordings": len(files),
                               "minimums_before": {"verify": settings.voice.min_net_speech_verify_s,
                                                   "enrol_total": settings.voice.min_total_net_speech_enroll_s}}
    if "vad" not in a.skip:
        store = ModelStore(settings)
        grid = [GRID[i] for i in a.grid] if a.grid else list(GRID)
        results["vad"] = vad_study(store.path(settings.voice.vad), files, audio, settings.voice, grid)
    if "duration" not in a.skip:
        results["duration"] = duration_study(settings, files, audio)
    write_results(a.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
