"""One code path: the local voice evaluation (the service's engine and enrolment rule, in process)
and the evaluation through the running VoiceService give the same decision, refusing layer and
failure for every trial, and the same score.

Trials: those of trials_voice.csv whose enrolment is one of four speakers (genuine and impostor),
plus a recording cut to 0.4 s of speech as an enrolment and as a probe, which both refuse for too
little net speech. Wideband, whole recordings, the tenant "eval-parity" of the test service (no AASIST
layer: test_layers.py covers it; the replay layer runs on both sides).

Score tolerance 1e-5: the service returns the cosine as a float32 (rounding <= 6e-8) and embeds
micro-batched, where onnxruntime may sum in another order than at batch 1 (~1e-6); another
template, crop or VAD would move the cosine by far more.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from services.common.api.v1 import voice_pb2_grpc
from services.common.evaluation.runner import run_verification
from services.common.evaluation.trials import read_trials
from services.voice.evaluation import VoiceDecisionScorer, local_engine
from services.voice.remote_eval import RemoteVoiceScorer
from tests.conftest import present, side_by_side

pytestmark = pytest.mark.eval  # evaluation-grade: a whole fixture list through the models

TOLERANCE = 1e-5
SPEAKERS = ("libri_1688", "libri_2033", "libri_3005", "speechbrain_spk1")


def _outcome(r):
    failure = (r.stage, r.failure.layer, r.failure.reason) if r.failure else None
    decision = (r.decision.accepted, r.decision.refused_by) if r.decision else None
    return failure, decision


@pytest.fixture(scope="module")
def trials(fixtures_dir: Path, tmp_path_factory):
    trials = [t for t in read_trials(fixtures_dir / "trials_voice.csv", fixtures_dir) if t.enroll_identity in SPEAKERS]
    short_dir = tmp_path_factory.mktemp("short")
    x, rate = sf.read(fixtures_dir / "voice/verification/libri_1688/1688-142285-0000.wav", dtype="float32")
    short = short_dir / "short.wav"
    sf.write(short, x[: int(0.9 * rate)], rate)
    path = short_dir / "trials.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["enroll", "probe", "target"])
        w.writerow([short, fixtures_dir / "voice/verification/libri_1688/1688-142285-0004.wav", 1])
        w.writerow([trials[0].enroll[0], short, 1])
    return trials + read_trials(path, short_dir)


def test_voice_decisions_are_the_same_locally_and_through_the_service(voice_service, trials):
    settings = voice_service.settings
    remote = RemoteVoiceScorer(voice_pb2_grpc.VoiceServiceStub(voice_service.channel), voice_service.consent,
                               "wideband", "eval-parity")
    local = VoiceDecisionScorer(local_engine(settings), settings, "wideband", "eval-parity")
    try:
        local_run, remote_run = side_by_side(lambda: run_verification(local, trials),
                                             lambda: run_verification(remote, trials))
    finally:
        local.close()
    diffs = []
    for a, b in zip(local_run.results, remote_run.results, strict=True):
        if _outcome(a) != _outcome(b):
            diffs.append(f"{a.trial.probe.name}: local {_outcome(a)}, service {_outcome(b)}")
        elif a.score is not None and abs(a.score - present(b.score)) > TOLERANCE:
            diffs.append(f"{a.trial.probe.name}: local {a.score}, service {b.score}")
    assert diffs == []
    gaps = [abs(a.score - present(b.score)) for a, b in zip(local_run.results, remote_run.results, strict=True) if a.score is not None]
    print(f"\n{len(gaps)} scored trials, largest score difference {max(gaps):.2e}")
    reasons = local_run.failure_reasons
    assert reasons.get("enrol:low_net_speech") == 1 and reasons.get("probe:low_net_speech") == 1
    decided = [r for r in local_run.results if r.decision]
    assert {present(r.decision).accepted for r in decided} == {True, False}
    assert all([n for n, _ in present(r.decision).layers] == ["comparison", "anti_spoofing"] for r in decided)
    assert np.mean([present(r.decision).accepted for r in decided if r.trial.target]) > 0.9
