"""Calibration record of the voice replay cache's fingerprint (services/voice/replay.py), with a
held-out check, written to the model manifest (entry ``replay-envelope-v1``, channel
``telephone-band``: every capture is fingerprinted in the telephone band, whatever its channel).

    .venv/bin/python -m bench.voice_replay_calibration [--write]

The cache compares a new capture with the subject's retained accepted captures; a "match" is a
replay. So, read as a comparison:

* impostor trials: two *different* captures (a customer's new answer against an old one). A score
  at or above the threshold refuses a fresh, genuine capture as a replay: FMR is that rate, per
  comparison. Two groups, and each threshold keeps both within its target: read speech (the
  LibriSpeech fixture recordings, 12 speakers, cut into consecutive 3 s pieces, every pair) and what
  the cache compares in service, one person's answers to digit challenges (the spoken-digit
  fixtures' first speaker: his takes joined into 6-digit answers with pauses as
  bench/voice_digits.py joins them; pairs only between answers that share no take, within each of
  several partitions of his takes).
* genuine trials: a capture and its replay (G.711 round trip; resampled 16-44.1-16 kHz; played
  through a loudspeaker in a room, RT60 0.3 s at 20 dB SNR and 0.5 s at 15 dB, then G.711). FNMR
  is the rate of replays the cache misses.

Held-out check: the other digit speaker's answers and replays, built the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from services.common.evaluation.calibration import calibration_record
from services.common.evaluation.metrics import binomial_ci
from services.common.models.calibration import CalibrationRecord
from services.voice import attacks, ingest, replay, telephone

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "voice"
RATE = 16000
PIECE_S = 3.0
TARGETS = (1e-3, 5e-4, 1e-4)
FIT_SPEAKER, CHECK_SPEAKER = "george", "jackson"
PARTITIONS = 64  # 16 answers each: 120 pairs per partition, 7,680 per speaker
MODEL, CHANNEL = replay.MODEL_ID, replay.CHANNEL


def g711(x: np.ndarray) -> np.ndarray:
    return attacks.resample(telephone.decode(telephone.encode(x)), 8000, RATE)


CONDITIONS = {
    "G.711 mu-law round trip": lambda x, i: g711(x),
    "resampled 16-44.1-16 kHz": lambda x, i: attacks.resample(attacks.resample(x, RATE, 44100), 44100, RATE),
    "loudspeaker, room RT60 0.3 s, SNR 20 dB, G.711": lambda x, i: g711(attacks.loudspeaker_room(x, RATE, 0.3, 20, i)),
    "loudspeaker, room RT60 0.5 s, SNR 15 dB, G.711": lambda x, i: g711(attacks.loudspeaker_room(x, RATE, 0.5, 15, i)),
}


def librispeech_pieces() -> list[np.ndarray]:
    out = []
    n = int(PIECE_S * RATE)
    for f in sorted((FIXTURES / "verification").glob("*/*.wav")):
        x, rate = sf.read(f, dtype="float32")
        assert rate == RATE and x.ndim == 1, f
        out += [x[i:i + n] for i in range(0, len(x) - n + 1, n)]
    return out


def digit_answers(speaker: str, partitions: int, seed: int = 11, per_answer: int = 6) -> list[list[np.ndarray]]:
    """16 kHz answers of ``speaker`` joined as bench/voice_digits.py joins them, in ``partitions``
    groups: within a group each take is used at most once (two answers of a group share no audio,
    as two real answers never do)."""
    from bench import voice_digits as vd

    takes = vd.load_takes(FIXTURES / "digits")
    pool = [x for d in range(10) for x in takes[(speaker, d)]]
    rng = np.random.default_rng([seed, sum(map(ord, speaker))])
    groups = []
    for _ in range(partitions):
        order = rng.permutation(len(pool))
        group = []
        for k in range(len(pool) // per_answer):
            speech = [vd.faded(pool[j]) for j in order[k * per_answer:(k + 1) * per_answer]]
            y = vd.joined(speech, vd.answer_gaps(rng, per_answer), rng)
            x16 = soxr.resample(y, vd.RATE, RATE, quality="HQ").astype(np.float32)
            group.append(ingest.condition(x16, RATE).samples)
        groups.append(group)
    return groups


def pair_scores(fps: list[replay.Fingerprint]) -> np.ndarray:
    return np.array([replay.similarity(fps[i], fps[j]) for i in range(len(fps)) for j in range(i + 1, len(fps))])


def replay_scores(clips: list[np.ndarray], fps: list[replay.Fingerprint]) -> dict[str, np.ndarray]:
    """Per condition, each clip against its replay."""
    return {name: np.array([replay.similarity(replay.fingerprint(fn(x, i)), fp)
                            for i, (x, fp) in enumerate(zip(clips, fps, strict=True))]) for name, fn in CONDITIONS.items()}


def answer_scores(groups: list[list[np.ndarray]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pairs within each group; replays of the first group's answers."""
    fps = [[replay.fingerprint(x) for x in g] for g in groups]
    return np.concatenate([pair_scores(f) for f in fps]), replay_scores(groups[0], fps[0])


def held_out(threshold: float, target: float, impostor: np.ndarray, genuine: np.ndarray) -> dict:
    errors = int(np.count_nonzero(impostor >= threshold))
    lo, hi = binomial_ci(errors, impostor.size)
    return {"dataset": f"fixtures/voice/digits, speaker {CHECK_SPEAKER}: 6-digit answers (pairs within {PARTITIONS} "
                       "partitions of his takes) and their replays",
            "trials": {"genuine": int(genuine.size), "impostor": int(impostor.size)},
            "fmr": errors / impostor.size, "fmr_ci95": [lo, hi],
            "fnmr": float(np.count_nonzero(genuine < threshold) / genuine.size),
            "consistent": lo <= target, "date": dt.date.today().isoformat(),
            "notes": f"{errors} of {impostor.size:,} pairs of his different answers at or above the threshold"}


def summary_of(scores_: np.ndarray, replays: dict[str, np.ndarray], threshold_s: list[float]) -> dict:
    return {"pairs": int(scores_.size), "top": [round(float(v), 3) for v in np.sort(scores_)[-6:][::-1]],
            "above": {f"{t:.3f}": int(np.count_nonzero(scores_ >= t)) for t in threshold_s},
            "replays": {k: {"n": int(v.size), "min": round(float(v.min()), 3), "median": round(float(np.median(v)), 3),
                            "missed": {f"{t:.3f}": int(np.count_nonzero(v < t)) for t in threshold_s}}
                        for k, v in replays.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help=f"set the record in models/manifest.yaml ({MODEL} [{CHANNEL}])")
    ap.add_argument("--json", type=Path, help="also write the scores' summary here")
    args = ap.parse_args(argv)

    pieces = librispeech_pieces()
    piece_fps = [replay.fingerprint(x) for x in pieces]
    read_pairs, read_replays = pair_scores(piece_fps), replay_scores(pieces, piece_fps)
    fit_pairs, fit_replays = answer_scores(digit_answers(FIT_SPEAKER, PARTITIONS))
    groups = {f"fixtures/voice/verification, 12 LibriSpeech speakers cut into {len(pieces)} pieces of {PIECE_S:g} s, "
              "every pair": read_pairs,
              f"fixtures/voice/digits, speaker {FIT_SPEAKER}: 6-digit answers, pairs within {PARTITIONS} partitions of "
              "his takes": fit_pairs}
    genuine = np.concatenate([*read_replays.values(), *fit_replays.values()])
    # Each threshold keeps both groups within its target; support needs the trials in each group.
    record = calibration_record(genuine, groups, target_fmrs=TARGETS, llr_kind=None, score_name=replay.SCORE,
                                dataset="; ".join(f"{k}: {v.size:,} pairs" for k, v in groups.items()), rate="FMR")
    check_pairs, check_replays = answer_scores(digit_answers(CHECK_SPEAKER, PARTITIONS))
    check_genuine = np.concatenate(list(check_replays.values()))
    record["operating_points"] = [p | {"held_out": held_out(p["threshold"], p["target_fmr"], check_pairs, check_genuine)}
                                  for p in record["operating_points"]]
    record["notes"] = (
        "Impostor: two different captures (FMR: a fresh capture refused as a replay, per comparison with one retained "
        "capture; the strictest of the two groups sets each threshold). Genuine: each capture against its replays "
        f"({'; '.join(CONDITIONS)}); FNMR: replays the cache misses. A subject with N retained captures "
        "(voice.replay_max_per_subject) is compared N times: a verification's false-replay rate is up to N x FMR. "
        "bench/voice_replay_calibration.py")
    CalibrationRecord.model_validate(record)

    thresholds = [p["threshold"] for p in record["operating_points"]] + [0.55]
    summary = {"points": [{k: p[k] for k in ("target_fmr", "threshold", "fmr", "fnmr", "supported")} |
                          {"held_out": {k: p["held_out"][k] for k in ("fmr", "fmr_ci95", "fnmr", "consistent")}}
                          for p in record["operating_points"]],
               "read speech": summary_of(read_pairs, read_replays, thresholds),
               f"answers {FIT_SPEAKER} (fit)": summary_of(fit_pairs, fit_replays, thresholds),
               f"answers {CHECK_SPEAKER} (held out)": summary_of(check_pairs, check_replays, thresholds)}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if args.write:
        from services.common.models import ModelStore
        from services.settings import load_config

        ModelStore(load_config()).update_calibration(MODEL, CHANNEL, record)
        print(f"wrote {MODEL} [{CHANNEL}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
