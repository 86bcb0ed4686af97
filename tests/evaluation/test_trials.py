"""Reading the fixtures' trial lists and building all-pairs trials from MANIFEST.csv."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from services.common.evaluation import trials as tr


def test_read_face_trials(fixtures_dir: Path):
    trials = tr.read_trials(fixtures_dir / "trials_face.csv")
    assert len(trials) == 257
    assert Counter(t.target for t in trials) == {True: 100, False: 157}
    assert Counter(t.trial_type for t in trials)["impostor_cross_source"] == 44
    first = trials[0]
    assert first.enroll == (
        fixtures_dir / "face/verification/alex_lacamoire/face_recognition_examples_alex-lacamoire.png",
    )
    assert first.probe.is_file() and first.target and first.enroll_identity == "alex_lacamoire"


def test_read_voice_trials(fixtures_dir: Path):
    trials = tr.read_trials(fixtures_dir / "trials_voice.csv")
    assert len(trials) == 448
    assert sum(t.target for t in trials) == 230
    assert all(t.probe.suffix == ".wav" for t in trials)


def test_read_pad(fixtures_dir: Path):
    face = tr.read_pad(fixtures_dir / "pad_face.csv")
    assert len(face) == 265
    assert sum(s.bonafide for s in face) == 108
    assert Counter(s.attack_type for s in face if not s.bonafide) == {
        "video replay on phone/screen (per tutorial protocol)": 155,
        "unspecified (F=fake per repo README)": 2,
    }
    assert all(s.attack_type == "" for s in face if s.bonafide)
    voice = tr.read_pad(fixtures_dir / "pad_voice.csv")
    assert len(voice) == 112 and all(s.bonafide for s in voice)


def test_all_pairs_face(fixtures_dir: Path):
    entries = tr.read_manifest(fixtures_dir)
    assert len(entries) == 439
    pairs = tr.all_pairs(entries, "face")
    # 62 face verification photos -> C(62, 2); same-identity pairs: sum of C(n_id, 2) = 100.
    assert len(pairs) == 62 * 61 // 2
    assert sum(p.target for p in pairs) == 100
    assert all((p.enroll_identity == p.probe_identity) == p.target for p in pairs)
    assert all(str(p.enroll[0]) < str(p.probe) for p in pairs)
    assert pairs == tr.all_pairs(list(reversed(entries)), "face")  # order-independent


def test_all_pairs_voice_includes_combined_tasks_and_skips_unknown(fixtures_dir: Path):
    entries = tr.read_manifest(fixtures_dir)
    pairs = tr.all_pairs(entries, "voice")  # task "verification+pad" counts as verification
    assert len(pairs) == 112 * 111 // 2
    assert sum(p.target for p in pairs) == 10 * 45 + 2 * 15
    # Face PAD files have identity "unknown": never paired.
    assert tr.all_pairs(entries, "face", task="pad") == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_multi_sample_enrolment_and_relative_root(tmp_path: Path):
    for name in ("a1.wav", "a2.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"x")
    csv_path = _write(
        tmp_path / "t.csv",
        "enroll,probe,target\na1.wav;a2.wav,b.wav,0\n",
    )
    (t,) = tr.read_trials(csv_path)
    assert t.enroll == (tmp_path / "a1.wav", tmp_path / "a2.wav")
    assert t.trial_type == "impostor" and t.enroll_identity == ""


def test_bad_trial_files_fail_loudly(tmp_path: Path):
    (tmp_path / "a.wav").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="t.csv:2"):
        tr.read_trials(_write(tmp_path / "t.csv", "enroll,probe,target\na.wav,missing.wav,1\n"))
    assert len(tr.read_trials(tmp_path / "t.csv", check_exists=False)) == 1
    with pytest.raises(ValueError, match="0 or 1"):
        tr.read_trials(_write(tmp_path / "t.csv", "enroll,probe,target\na.wav,a.wav,yes\n"))
    with pytest.raises(ValueError, match="identities"):
        tr.read_trials(
            _write(
                tmp_path / "t.csv",
                "enroll,probe,target,enroll_identity,probe_identity\na.wav,a.wav,1,x,y\n",
            )
        )
    with pytest.raises(ValueError, match="missing columns"):
        tr.read_trials(_write(tmp_path / "t.csv", "enroll,probe\na.wav,a.wav\n"))
    with pytest.raises(ValueError, match="label"):
        tr.read_pad(_write(tmp_path / "p.csv", "path,label,attack_type\na.wav,fake,\n"))


def test_attack_without_type_is_unspecified(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"x")
    (s,) = tr.read_pad(_write(tmp_path / "p.csv", "path,label,attack_type\na.png,spoof,\n"))
    assert (s.bonafide, s.attack_type) == (False, tr.UNSPECIFIED_ATTACK)
