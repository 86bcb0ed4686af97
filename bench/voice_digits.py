"""Digit challenge on real speech: recognisers, match rules and the chance that a wrong string passes.

    .venv/bin/python -m bench.voice_digits [--strings 100] [--dev-strings 50] [--candidates ...] [--out FILE.json]
    .venv/bin/python -m bench.voice_digits --markdown FILE.json      # the tables of bench/RESULTS.md

Speech: ../shared/fixtures/voice/digits, isolated digits of the Free Spoken Digit Dataset (8 kHz, two
speakers x 10 digits x 10 takes). A spoken string is 6 uniformly random digits (as the service draws
them), each a random take of one speaker, joined with pauses of 150-400 ms, with 0.3-0.8 s before
and after, over a -55 dBFS noise floor (the recordings' own floor: a capture is never digital
silence), each take faded in and out over 10 ms.
  clean     as joined;
  degraded  the string 0-20 dB quieter, each digit +-3 dB, pink noise at 15-25 dB SNR (a phone held
            further away, a quiet room).
Channels, from the caller's 16 kHz audio (the 8 kHz takes resampled by soxr, as an app records):
  wideband   16 kHz LINEAR16, through the service's conditioning (services/voice/ingest.py);
  telephone  the telephone simulation (services/voice/telephone.py: 300-3400 Hz, 8 kHz, G.711,
             mu-law for even strings and A-law for odd ones), decoded and conditioned as the
             service does for an IVR.
Split: george is the development speaker (the recogniser, its settings and the match rule were
chosen on his strings); jackson is held out and is what bench/RESULTS.md reports.

Match rules (heard vs the challenge): exact; one substitution (same length, one digit wrong); one
edit (one digit wrong, missing or extra: edit distance 1); two edits. Per-digit accuracy is
1 - edit distance / 6. Cost per string: recognition alone, one intra-op thread; CPU time of the
process (what a CPU-bound service pays; robust to other load on the machine) and wall time.

Wrong strings: the recogniser's output never depends on the challenge (only on its length), so a
recording of other digits passes a new challenge exactly when its recognised string is within the
rule of that challenge. Exact: for each recognised held-out string, the share of all 10^6
challenges within the rule (enumerated); plus the worst case over every heard length (an attacker
may say 5 or 7 digits). Empirical: every held-out recording against fresh uniformly random
challenges, and against the other held-out strings' digits (a customer's previous answer
replayed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
import soundfile as sf
import soxr

from services.common.config import PROJECT_ROOT
from services.settings import load_config
from services.voice import ingest, telephone
from services.voice.digits import (
    END_OF_TEXT, MAX_FRAMES, PROMPT, WORDS, DigitRecognizer, digit_errors, log_mel,
)

ROOT = Path(__file__).resolve().parents[1]

DIGITS_DIR = ROOT.parent / "shared" / "fixtures" / "voice" / "digits"
RATE = 8000
N_DIGITS = 6
SPLITS = {"dev": "george", "heldout": "jackson"}
CHANNELS = ("wideband", "telephone")
CONDITIONS = ("clean", "degraded")
FLOOR_DBFS = -55.0
Takes = dict[tuple[str, int], list[np.ndarray]]  # (speaker, digit) -> takes 0..9


# ---------------------------------------------------------------------------------------------
# Spoken strings and channels


def load_takes(root: Path = DIGITS_DIR) -> Takes:
    takes: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    for path in root.glob("*.wav"):
        digit, speaker, take = path.stem.split("_")
        x, rate = sf.read(path, dtype="float32")
        assert rate == RATE and x.ndim == 1, path
        takes.setdefault((speaker, int(digit)), {})[int(take)] = x
    return {k: [v[i] for i in sorted(v)] for k, v in takes.items()}


def _db(x: float) -> float:
    return 10.0 ** (x / 20.0)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.normal(size=n))
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1.0 / RATE), 50.0))
    y = np.fft.irfft(spectrum, n)
    return (y / np.sqrt(np.mean(y ** 2))).astype(np.float32)


def answer_gaps(rng: np.random.Generator, n: int = N_DIGITS) -> list[float]:
    """Seconds of silence before, between and after ``n`` spoken digits."""
    return [rng.uniform(0.3, 0.8), *(rng.uniform(0.15, 0.4) for _ in range(n - 1)), rng.uniform(0.3, 0.8)]


def faded(x: np.ndarray) -> np.ndarray:
    """A copy of a take with 10 ms fades at both ends (no click where it meets the silence)."""
    fade = np.minimum(1.0, np.arange(RATE // 100) / (RATE // 100)).astype(np.float32)
    y = x.copy()
    y[: len(fade)] *= fade
    y[len(y) - len(fade):] *= fade[::-1]
    return y


def joined(speech: list[np.ndarray], gaps: list[float], rng: np.random.Generator) -> np.ndarray:
    """Takes (already faded) between the gaps' silences, over a -55 dBFS noise floor: 8 kHz."""
    parts = [np.zeros(int(gaps[0] * RATE), np.float32)]
    for x, gap in zip(speech, gaps[1:], strict=True):
        parts += [x, np.zeros(int(gap * RATE), np.float32)]
    y = np.concatenate(parts)
    return y + rng.normal(0.0, _db(FLOOR_DBFS), len(y)).astype(np.float32)


def spoken_string(takes: Takes, speaker: str, rng: np.random.Generator, degraded: bool = False) -> tuple[str, np.ndarray]:
    """-> (the digits, their 8 kHz audio)"""
    digits = "".join(str(d) for d in rng.integers(0, 10, N_DIGITS))
    gaps = answer_gaps(rng)
    speech = []
    for d in digits:
        options = takes[(speaker, int(d))]
        x = faded(options[int(rng.integers(len(options)))])
        if degraded:
            x *= _db(rng.uniform(-3.0, 3.0))
        speech.append(x)
    y = joined(speech, gaps, rng)
    if degraded:
        gain = _db(rng.uniform(-20.0, 0.0))
        speech_rms = gain * math.sqrt(float(np.mean(np.concatenate(speech) ** 2)))
        y = y * gain + pink_noise(len(y), rng) * speech_rms * _db(-rng.uniform(15.0, 25.0))
    return digits, y.astype(np.float32)


def through_channel(x8k: np.ndarray, channel: str, law: telephone.Law = "mulaw") -> np.ndarray:
    """The 16 kHz samples the service recognises for a caller's string on ``channel``."""
    x16 = soxr.resample(x8k, RATE, 16000, quality="HQ").astype(np.float32)
    if channel == "wideband":
        return ingest.condition(x16, 16000).samples
    y = telephone.decode(telephone.encode(x16, 16000, law), law)
    return ingest.condition(y, telephone.TELEPHONE_RATE).samples


@dataclass
class Recording:
    split: str
    condition: str
    channel: str
    digits: str
    samples: np.ndarray


def recordings(takes: Takes, split: str, n: int, seed: int) -> list[Recording]:
    out = []
    for c, condition in enumerate(CONDITIONS):
        rng = np.random.default_rng([seed, c])
        for i in range(n):
            digits, x = spoken_string(takes, SPLITS[split], rng, degraded=condition == "degraded")
            for channel in CHANNELS:
                out.append(Recording(split, condition, channel, digits,
                                     through_channel(x, channel, "mulaw" if i % 2 == 0 else "alaw")))
    return out


# ---------------------------------------------------------------------------------------------
# Match rules and their pass probabilities


RULES: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda h, e: h == e,
    "one_substitution": lambda h, e: len(h) == len(e) and sum(a != b for a, b in zip(h, e, strict=True)) <= 1,
    "one_edit": lambda h, e: digit_errors(h, e) <= 1,
    "two_edits": lambda h, e: digit_errors(h, e) <= 2,
}
RULE_EDITS = {"exact": 0, "one_edit": 1, "two_edits": 2}


def _all_challenges() -> np.ndarray:
    return np.array(list(itertools.product(range(10), repeat=N_DIGITS)), dtype=np.int8)


def challenges_within(heard: str, rule: str, challenges: np.ndarray) -> int:
    """How many of the 10^N_DIGITS challenges ``heard`` passes under ``rule`` (vectorised DP)."""
    h = np.array([int(c) for c in heard], dtype=np.int8)
    if rule == "one_substitution":
        return 0 if len(h) != N_DIGITS else int(np.count_nonzero((challenges != h).sum(axis=1) <= 1))
    row = np.tile(np.arange(N_DIGITS + 1, dtype=np.int16), (len(challenges), 1))
    for i, digit in enumerate(h, 1):
        prev = row.copy()
        row[:, 0] = i
        for j in range(1, N_DIGITS + 1):
            row[:, j] = np.minimum(np.minimum(prev[:, j] + 1, row[:, j - 1] + 1),
                                   prev[:, j - 1] + (challenges[:, j - 1] != digit))
    return int(np.count_nonzero(row[:, -1] <= RULE_EDITS[rule]))


def worst_heard(rule: str, challenges: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Closed forms checked by enumeration: the most challenges one heard string of each length passes."""
    out = {}
    for length in (N_DIGITS - 2, N_DIGITS - 1, N_DIGITS, N_DIGITS + 1):
        samples = ["".join(str(d) for d in rng.integers(0, 10, length)) for _ in range(20)]
        samples += ["0123456789"[:length], ("0123456789" * 2)[1:length + 1]]  # all digits distinct
        out[str(length)] = max(challenges_within(s, rule, challenges) for s in samples) / len(challenges)
    return out


def closed_form(rule: str) -> float:
    """Pass probability of a uniformly random challenge for a correctly heard 6-digit string."""
    n = N_DIGITS
    if rule == "exact":
        return 10.0 ** -n
    if rule in ("one_substitution", "one_edit"):
        return (1 + 9 * n) / 10.0 ** n  # for equal lengths one edit can only be one substitution
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Candidates


class PocketSphinx:
    """The service's recogniser until now: a JSGF grammar of exactly n digit words (CMU en-us model)."""

    def __init__(self, **settings) -> None:
        import pocketsphinx

        model = Path(pocketsphinx.get_model_path()) / "en-us"
        self.config = dict(hmm=str(model / "en-us"), dict=str(model / "cmudict-en-us.dict"), samprate=16000,
                           loglevel="FATAL", **settings)
        self.decoders: dict[int, Any] = {}  # pocketsphinx Decoders
        self.value = {w: str(i) for i, w in enumerate(WORDS)} | {"oh": "0"}

    def recognise(self, samples: np.ndarray, n: int) -> str:
        from pocketsphinx import Config, Decoder

        if n not in self.decoders:
            decoder = Decoder(Config(**self.config))
            words = " | ".join((*WORDS, "oh"))
            decoder.add_jsgf_string("digits", f"#JSGF V1.0;\ngrammar digits;\n<digit> = {words};\n"
                                              f"public <digits> = {' '.join(['<digit>'] * n)};\n")
            decoder.activate_search("digits")
            self.decoders[n] = decoder
        decoder = self.decoders[n]
        decoder.start_utt()
        decoder.process_raw((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes(), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return "" if hyp is None else "".join(self.value.get(w, "") for w in hyp.hypstr.split())


_SPOKEN = {w: str(i) for i, w in enumerate(WORDS)} | {"oh": "0", "o": "0", "for": "4", "to": "2", "too": "2",
                                                      "won": "1", "ate": "8"}


class WhisperVariant:
    """Whisper tiny.en other ways, in its full 30 s window: free text (digits and number words mapped
    to digits), or restricted to digit tokens. Like the service's, cut at n digits."""

    def __init__(self, rec: DigitRecognizer, digits_only: bool) -> None:
        self.rec, self.digits_only = rec, digits_only

    def recognise(self, samples: np.ndarray, n: int) -> str:
        features = self.rec._ct2.StorageView.from_array(np.ascontiguousarray(log_mel(samples, MAX_FRAMES)[None]))
        if self.digits_only:
            r = self.rec.model.generate(features, [PROMPT], beam_size=1, max_length=2 * n + 4, suppress_blank=False,
                                        suppress_tokens=self.rec._suppress)[0]
            return "".join(t for t in r.sequences[0] if t != END_OF_TEXT).replace("\u0120", "")[:n]
        text = "".join(self.rec.model.generate(features, [PROMPT], beam_size=1, max_length=64)[0].sequences[0])
        words = re.findall(r"[a-z]+|\d", text.replace("\u0120", " ").lower())
        return "".join(w if w.isdigit() else _SPOKEN.get(w, "") for w in words)[:n]


def model_dir() -> Path:
    from services.common.models import ModelStore

    settings = load_config(None, models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    store = ModelStore(settings)
    model_id = settings.voice.digits
    store.fetch([model_id])
    return store.path(model_id, "model.bin").parent


class Recogniser(Protocol):
    def recognise(self, samples: NDArray[np.float32], n: int) -> str: ...


def candidates(names: Iterable[str]) -> dict[str, Callable[[], Recogniser]]:
    rec: list[DigitRecognizer] = []

    def whisper() -> DigitRecognizer:
        if not rec:
            rec.append(DigitRecognizer(model_dir(), workers=1, threads=1))
        return rec[0]

    factories: dict[str, Callable[[], Recogniser]] = {
        "pocketsphinx-jsgf": lambda: PocketSphinx(lw=2.0, silprob=0.1, fwdflat=False, bestpath=False),
        "pocketsphinx-jsgf-defaults": lambda: PocketSphinx(),
        "whisper-tiny.en-text-30s": lambda: WhisperVariant(whisper(), digits_only=False),
        "whisper-tiny.en-digits-30s": lambda: WhisperVariant(whisper(), digits_only=True),
        "whisper-tiny.en-digits": whisper,  # the service's recogniser (services/voice/digits.py)
    }
    return {name: factories[name] for name in names}


CHOSEN = "whisper-tiny.en-digits"
CANDIDATES = ["pocketsphinx-jsgf", "pocketsphinx-jsgf-defaults", "whisper-tiny.en-text-30s",
              "whisper-tiny.en-digits-30s", CHOSEN]


# ---------------------------------------------------------------------------------------------


def evaluate(name: str, recogniser, recs: list[Recording]) -> tuple[list[dict], list[str]]:
    heard, ms, cpu_ms = [], [], []
    for r in recs:
        t, c = time.perf_counter(), time.process_time()
        heard.append(recogniser.recognise(r.samples, N_DIGITS))
        ms.append(1000.0 * (time.perf_counter() - t))
        cpu_ms.append(1000.0 * (time.process_time() - c))
    rows = []
    for key in sorted({(r.split, r.condition, r.channel) for r in recs}):
        idx = [i for i, r in enumerate(recs) if (r.split, r.condition, r.channel) == key]
        row = {"candidate": name, "split": key[0], "speaker": SPLITS[key[0]], "condition": key[1],
               "channel": key[2], "strings": len(idx),
               "digit_accuracy": round(1 - sum(digit_errors(heard[i], recs[i].digits) for i in idx) / (N_DIGITS * len(idx)), 4),
               "cpu_ms_per_string": round(float(np.mean([cpu_ms[i] for i in idx])), 1),
               "wall_ms_per_string": round(float(np.mean([ms[i] for i in idx])), 1),
               "wall_ms_p95": round(float(np.percentile([ms[i] for i in idx], 95)), 1)}
        for rule, ok in RULES.items():
            row[f"accept_{rule}"] = round(sum(ok(heard[i], recs[i].digits) for i in idx) / len(idx), 4)
        row["length_errors"] = sum(len(heard[i]) != N_DIGITS for i in idx)
        row["errors"] = [f"{recs[i].digits}->{heard[i]}" for i in idx if heard[i] != recs[i].digits][:12]
        rows.append(row)
    return rows, heard


def wrong_string_pass(heard: list[str], recs: list[Recording], seed: int, per_recording: int) -> list[dict]:
    challenges = _all_challenges()
    rng = np.random.default_rng(seed)
    out = []
    for rule in RULES:
        exact = [challenges_within(h, rule, challenges) / len(challenges) for h in heard]
        fresh = passes = 0
        for h in heard:
            for c in rng.integers(0, 10, (per_recording, N_DIGITS)):
                passes += RULES[rule](h, "".join(map(str, c)))
                fresh += 1
        replayed = replay_passes = 0
        for i, h in enumerate(heard):
            for r in recs:
                if recs[i].digits != r.digits:
                    replay_passes += RULES[rule](h, r.digits)
                    replayed += 1
        out.append({
            "rule": rule,
            "exact_mean_over_heard": float(np.mean(exact)), "exact_max_over_heard": float(np.max(exact)),
            "closed_form_6_heard_right": closed_form(rule),
            "worst_case_by_heard_length": worst_heard(rule, challenges, rng),
            "empirical_fresh_challenges": {"trials": fresh, "passes": int(passes), "rate": passes / fresh},
            "empirical_previous_answers": {"trials": replayed, "passes": int(replay_passes),
                                           "rate": replay_passes / replayed},
        })
    return out


def markdown(report: dict) -> str:
    """The tables of bench/RESULTS.md: per candidate and channel, each condition's acceptance."""
    lines = ["| recogniser | split | channel | condition | exact | one substitution | one edit | two edits "
             "| per digit | length errors | CPU ms / string |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['candidate']} | {r['speaker']} ({r['split']}) | {r['channel']} | {r['condition']} | "
                     + " | ".join(f"{100 * r['accept_' + rule]:.0f} %" for rule in RULES)
                     + f" | {100 * r['digit_accuracy']:.1f} % | {r['length_errors']} | {r['cpu_ms_per_string']:.0f} |")
    lines += ["", "| rule | exact: mean over heard held-out strings | exact: worst heard string (by length) "
              "| fresh challenges: passes / trials | previous answers: passes / trials |", "|---|---|---|---|---|"]
    for w in report.get("wrong_string_pass", []):
        worst = ", ".join(f"{k}: {v:.2g}" for k, v in w["worst_case_by_heard_length"].items())
        f, p = w["empirical_fresh_challenges"], w["empirical_previous_answers"]
        lines.append(f"| {w['rule']} | {w['exact_mean_over_heard']:.3g} | {worst} | {f['passes']} / {f['trials']:,} "
                     f"({f['rate']:.2g}) | {p['passes']} / {p['trials']:,} ({p['rate']:.2g}) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strings", type=int, default=100, help="held-out strings per condition")
    ap.add_argument("--dev-strings", type=int, default=50, help="development strings per condition (0: none)")
    ap.add_argument("--candidates", nargs="+", default=CANDIDATES, choices=CANDIDATES)
    ap.add_argument("--challenges-per-recording", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=20261204)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--markdown", type=Path, help="print the tables of a report written by --out, and stop")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0

    takes = load_takes()
    recs = recordings(takes, "heldout", args.strings, args.seed)
    if args.dev_strings:
        recs = recordings(takes, "dev", args.dev_strings, args.seed + 1) + recs
    report: dict = {"strings_per_condition": {"heldout": args.strings, "dev": args.dev_strings}, "results": []}
    chosen_heard = None
    for name, factory in candidates(args.candidates).items():
        recogniser = factory()
        recogniser.recognise(np.zeros(8000, np.float32), N_DIGITS)  # load and warm up
        rows, heard = evaluate(name, recogniser, recs)
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "errors"}), flush=True)
        report["results"] += rows
        if name == CHOSEN:
            chosen_heard = heard
    if chosen_heard is not None:
        idx = [i for i, r in enumerate(recs) if r.split == "heldout"]
        report["wrong_string_pass"] = wrong_string_pass([chosen_heard[i] for i in idx], [recs[i] for i in idx],
                                                        args.seed + 2, args.challenges_per_recording)
        for row in report["wrong_string_pass"]:
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
