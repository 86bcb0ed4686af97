"""The AASIST layer on genuine spoken-digit answers (the second source: never used to choose the
window), before and after the speech-only window, per channel.

Answers as bench/genuine_rates.py sends them: a random 6-digit string per answer, the speaker's own
takes 3-9 of ../shared/fixtures/voice/digits joined with 0.25 s digital-zero pauses
(tests/mfa/spoken_digits.py); app: resampled to 16 kHz (wideband family), IVR: G.711 mu-law 8 kHz
(telephone family). Each answer is prepared by the service's pipeline, then scored on the window
the layer used before (the clip's most speech-dense window, tiled when shorter; record
``bonafide_log_odds@speech<w>s`` of ``--old-manifest``) and on the speech-only window (record
``bonafide_log_odds@speechonly<w>s`` of the configured manifest), each at voice.antispoof_target_apcer.

    .venv/bin/python -m bench.voice_antispoof_digits --old-manifest FILE [--answers 60] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from bench.voice_antispoof_conditions import clip_window
from services.common.modality.calibration import Calibrations
from services.common.models import ModelStore
from services.settings import load_config
from services.voice.antispoof import SyntheticSpeechDetector, speech_window
from services.voice.engine import antispoof_window_s, pad_score_name
from services.voice.evaluation import _MULAW_8K
from services.voice.ingest import AudioError, AudioFormat
from services.voice.models import VoiceModels, pipeline_from_settings
from tests.mfa import spoken_digits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-manifest", required=True)
    ap.add_argument("--answers", type=int, default=60, help="per speaker and channel")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out")
    a = ap.parse_args()
    os.environ.setdefault("BIOGATE_LOGGING__LEVEL", "WARNING")
    settings = load_config()
    cfg = settings.voice
    store = ModelStore(settings)
    det = VoiceModels.choose(store.manifest, cfg).antispoof_detector(store, threads=1, device="cpu")
    assert det is not None
    pipeline = pipeline_from_settings(settings)
    old, new = Calibrations(a.old_manifest, 0.0), Calibrations(settings.models.manifest, 0.0)
    target = cfg.antispoof_target_apcer
    report = {}
    for family, channel in (("wideband", "app"), ("telephone", "ivr")):
        w = antispoof_window_s(cfg, family)
        layer = SyntheticSpeechDetector(det, w)
        cal = cfg.calibration_channels[family]
        t_old = old.threshold("aasist", cal, target, f"bonafide_log_odds@speech{w:g}s")
        t_new = new.threshold("aasist", cal, target, pad_score_name(w))
        rng = random.Random(a.seed)
        passed = {"clip": 0, "speech": 0}
        n = refused_input = 0
        for speaker in spoken_digits.SPEAKERS:
            for _ in range(a.answers):
                digits = "".join(rng.choice("0123456789") for _ in range(cfg.challenge_digits))
                if channel == "app":
                    data, fmt = spoken_digits.answer(digits, speaker, rng, rate=16000), AudioFormat()
                else:
                    data, fmt = spoken_digits.over_the_line(spoken_digits.answer(digits, speaker, rng)), _MULAW_8K
                try:
                    p = pipeline.prepare(data, fmt, "verify")
                except AudioError:
                    refused_input += 1
                    continue
                n += 1
                s_old = layer.score_windows([clip_window(p.samples, p.vad.segments, layer.window)])[0]
                s_new = layer.score_windows([speech_window(p.samples, p.vad.segments, layer.window)])[0]
                passed["clip"] += s_old >= t_old
                passed["speech"] += s_new >= t_new
        report[channel] = {"answers": n, "refused_at_ingest": refused_input, "threshold_before": t_old,
                           "threshold_after": t_new, "passed_before": passed["clip"], "passed_after": passed["speech"]}
        print(channel, json.dumps(report[channel]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
