"""Digit recognisers: what each costs in memory, and the CPU of one recognition.

    .venv/bin/python -m bench.voice_digit_recognisers [--counts 1 2 4 8] [--strings 8] [--rounds 3]

Each count runs in a process of its own (``--child K``): the Python side (numpy, ctranslate2, the
real spoken strings) first, then one :class:`services.voice.digits.DigitRecognizer` with K
CTranslate2 workers (``inter_threads``, what ``voice.digit_recognisers`` sets) and one intra-op
thread each, as the service builds it. The strings are built as bench/voice_digits.py builds them
(held-out speaker jackson, clean and degraded, wideband and telephone), and K threads recognise them
at once for ``--rounds`` passes, so that every worker has run. Memory: VmRSS before the model,
after loading it, and after the passes; VmHWM (peak) at the end. CPU: process CPU time per
recognition, one at a time (count 1), then K at a time (the same per string when the cores are
free; on a loaded machine, more).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SEED = 7_700_001  # not bench/voice_digits.py's, nor the tests'


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(count: int, strings: int, rounds: int) -> dict:
    import numpy as np  # noqa: F401 - imported before the baseline, as in the service
    import ctranslate2  # noqa: F401

    from bench import voice_digits as vd
    from services.common.config import PROJECT_ROOT
    from services.common.models import ModelStore
    from services.settings import load_config
    from services.voice.config import VoiceConfig
    from services.voice.digits import DigitRecognizer, digit_errors

    recs = vd.recordings(vd.load_takes(), "heldout", strings, SEED)
    settings = load_config(None, models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    store = ModelStore(settings)
    model_id = VoiceConfig().digits
    store.fetch([model_id])
    before = _status_mb("VmRSS")
    recogniser = DigitRecognizer(store.path(model_id).parent, workers=count, threads=1)
    loaded = _status_mb("VmRSS")
    assert recogniser.model.num_workers == count

    def run(r: vd.Recording) -> str:
        return recogniser.recognise(r.samples, len(r.digits))

    serial_cpu = time.process_time()
    serial = [run(r) for r in recs]
    serial_cpu = time.process_time() - serial_cpu
    with ThreadPoolExecutor(count) as pool:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            together = list(pool.map(run, recs))
            assert together == serial, "concurrent recognitions differ from one at a time"
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = rounds * len(recs)
    return {"recognisers": count, "strings": len(recs),
            "rss_before_mb": round(before, 1), "rss_loaded_mb": round(loaded, 1),
            "rss_after_mb": round(_status_mb("VmRSS"), 1), "peak_mb": round(_status_mb("VmHWM"), 1),
            "cpu_ms_one_at_a_time": round(1000 * serial_cpu / len(recs), 1),
            "cpu_ms_concurrent": round(1000 * cpu / n, 1), "wall_ms_concurrent": round(1000 * wall / n, 1),
            "within_one_edit": sum(digit_errors(h, r.digits) <= 1 for h, r in zip(serial, recs, strict=True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--strings", type=int, default=4, help="per condition: x2 conditions x2 channels")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.strings, args.rounds)))
        return
    rows = []
    for count in args.counts:
        out = subprocess.run([sys.executable, "-m", "bench.voice_digit_recognisers", "--child", str(count),
                              "--strings", str(args.strings), "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| recognisers | RSS before the model MB | after loading | after the passes | peak (VmHWM) | "
          "recognisers' share (after - before) | CPU ms per recognition, one at a time | K at a time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recognisers']} | {r['rss_before_mb']:.0f} | {r['rss_loaded_mb']:.0f} | {r['rss_after_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['rss_after_mb'] - r['rss_before_mb']:.0f} | {r['cpu_ms_one_at_a_time']:.0f} | "
              f"{r['cpu_ms_concurrent']:.0f} |")


if __name__ == "__main__":
    main()
