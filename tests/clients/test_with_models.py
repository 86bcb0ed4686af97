"""The SDK, the `biogate client` commands, the README's login example and the `make demo` story
against real face, voice and MFA services with the default policy (one set for the module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from biogate_client import FailedPrecondition
from biogate_client.cli import main as client_cli
from services.common.config import PROJECT_ROOT
from services.demo import FIXTURES

pytestmark = pytest.mark.models

EXAMPLE = PROJECT_ROOT / "clients" / "python" / "examples" / "login.py"


def photo(identity: str, n: int) -> bytes:
    return sorted((FIXTURES / "face" / "identities" / identity).glob("*.jpg"))[n - 1].read_bytes()


def test_make_demo_starts_the_services_and_every_step_of_its_story_behaves():
    """`make demo` as a user runs it (python -m services.demo), on free ports so that it can run
    beside `make run`: its own services in a temporary data directory, the story, exit status 0."""
    run = subprocess.run([sys.executable, "-m", "services.demo", "--free-ports"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("demo: every step behaved"), run.stdout + run.stderr
    assert run.stdout.count("  ok   ") == 13 and "  FAIL " not in run.stdout, run.stdout


def test_the_readme_login_example_runs_as_written(with_models, tmp_path):
    with_models.client.record_consent("bank-a", "cust-0001", ["face"])
    with_models.client.set_phone("bank-a", "cust-0001", "+8613800138001")
    with_models.client.enrol_face("bank-a", "cust-0001", [photo("Abdullah", 1)])
    (tmp_path / "var").symlink_to(with_models.settings.data_dir)  # var/dev-credentials.json, var/sms-outbox.jsonl
    selfie = tmp_path / "selfie.jpg"
    selfie.write_bytes(photo("Abdullah", 2))
    env = {**os.environ, **{f"BIOGATE_{n.upper()}_ADDRESS": a for n, a in with_models.addresses.items()}}
    run = subprocess.run([sys.executable, str(EXAMPLE), str(selfie)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    passed, claims = run.stdout.splitlines()
    assert passed == "True" and "'decision': 'allow'" in claims and "'acr': 'aal2'" in claims, run.stdout


def test_face_enrolment_and_verification_from_the_command_line(with_models, tmp_path, capsys):
    a = with_models.addresses
    common = ["--mfa", a["mfa"], "--face", a["face"], "--voice", a["voice"], "--tenant", "cli-bank",
              "--credentials", str(with_models.settings.dev_credentials_file)]
    for n in (1, 2):
        (tmp_path / f"{n}.jpg").write_bytes(photo("Albert_Costa", n))
    assert client_cli(["consent", *common, "--subject", "cli-face-1", "--modalities", "face"]) == 0
    assert client_cli(["enrol-face", *common, "--subject", "cli-face-1", str(tmp_path / "1.jpg")]) == 0
    capsys.readouterr()
    assert client_cli(["verify-face", *common, "--subject", "cli-face-1", "--json", str(tmp_path / "2.jpg")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["match"] is True and r["livenessChecked"] is True and r["score"] > r["threshold"], r
    (tmp_path / "other.jpg").write_bytes(photo("Andy_Roddick", 1))
    assert client_cli(["verify-face", *common, "--subject", "cli-face-1", str(tmp_path / "other.jpg")]) == 1
    assert capsys.readouterr().out.startswith("verify-face: NO MATCH")
    bg = with_models.client
    assert bg.identify_face("cli-bank", photo("Albert_Costa", 2)).gallery_size == 0  # no consent to 1:N yet
    bg.record_consent("cli-bank", "cli-face-1", ["face"], identification=True)
    found = bg.identify_face("cli-bank", photo("Albert_Costa", 2))
    assert found.gallery_size == 1 and found.candidates[0].subject_id == "cli-face-1"
    assert found.candidates[0].above_threshold, found


def test_ivr_audio_streamed_without_a_challenge_is_refused_with_its_reason(with_models):
    with pytest.raises(FailedPrecondition) as err:
        with_models.client.stream_voice("bank-a", "cust-voice-1", [b"\xff" * 800] * 10)
    assert err.value.reason == "CHALLENGE_REQUIRED", err.value


def test_voice_from_the_command_line_and_ivr_audio_streamed_through_the_sdk(with_models, tmp_path, capsys):
    import random

    from tests.mfa import spoken_digits

    a = with_models.addresses
    common = ["--mfa", a["mfa"], "--face", a["face"], "--voice", a["voice"], "--tenant", "cli-bank",
              "--credentials", str(with_models.settings.dev_credentials_file)]
    files = []
    for n, utterance in enumerate(spoken_digits.enrolment("george")):
        files.append(tmp_path / f"enrol-{n}.wav")
        files[-1].write_bytes(utterance)
    assert client_cli(["consent", *common, "--subject", "cli-voice-1", "--modalities", "voice"]) == 0
    assert client_cli(["enrol-voice", *common, "--subject", "cli-voice-1", *map(str, files)]) == 0
    capsys.readouterr()
    assert client_cli(["voice-challenge", *common, "--subject", "cli-voice-1", "--json"]) == 0
    challenge = json.loads(capsys.readouterr().out)
    engine = with_models.bio.running["voice"].definition.service.engine
    answer = spoken_digits.heard_answer(engine, challenge["digits"], "george", random.Random(3),
                                        subject=("cli-bank", "cli-voice-1"))
    assert answer is not None
    (tmp_path / "answer.wav").write_bytes(answer)
    assert client_cli(["verify-voice", *common, "--subject", "cli-voice-1", f"--nonce={challenge['challenge']['nonce']}",
                       str(tmp_path / "answer.wav")]) == 0
    assert capsys.readouterr().out.startswith("verify-voice: MATCH")

    bg = with_models.client
    challenge = bg.voice_challenge("cli-bank", "cli-voice-1")
    mulaw = spoken_digits.heard_answer(engine, challenge.digits, "george", random.Random(4),
                                       subject=("cli-bank", "cli-voice-1"), telephone=True)
    assert mulaw is not None
    chunks = [mulaw[i:i + 1600] for i in range(0, len(mulaw), 1600)]  # 200 ms of G.711 each
    r = bg.stream_voice("cli-bank", "cli-voice-1", chunks, challenge.challenge.nonce)
    assert r.match and r.challenge_passed and r.spoof_checked, r
