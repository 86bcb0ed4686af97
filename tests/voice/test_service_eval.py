"""Acceptance: the service's own evaluation on trials_voice.csv, through the RPCs (remote scorer).

Enrolment (the whole recording) and probes (its middle 3 s, as an app or IVR verification phrase
and as the issue's reference run) go through Enroll/Verify of the running service, tenant "eval",
whose AASIST layer is off to keep the run within the suite's time: the scores do not depend on it;
the layers are measured on genuine speech in test_layers.py and bench/voice_genuine_layers.py. Measured
with the local pipeline on the same clips: 0.43 % (wideband) and 1.38 % (telephone); whole probes
gave the same figures at twice the run time.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from services.common.api.v1 import voice_pb2_grpc
from services.common.evaluation import metrics
from services.common.evaluation.runner import run_verification
from services.common.evaluation.trials import read_trials
from services.voice.engine import channel_target_fmr
from services.voice.config import ChannelFamily
from services.voice.remote_eval import RemoteVoiceScorer, subject_for
from tests.conftest import present

pytestmark = pytest.mark.eval  # evaluation-grade: a whole fixture list through the models

LIMITS = {"wideband": 0.010, "telephony-8k": 0.030}


@pytest.fixture(scope="module", params=list(LIMITS))
def service_run(request, voice_service, fixtures_dir):
    trials = read_trials(fixtures_dir / "trials_voice.csv", fixtures_dir)
    stub = voice_pb2_grpc.VoiceServiceStub(voice_service.channel)
    scorer = RemoteVoiceScorer(stub, voice_service.consent, request.param, probe_crop_s=3.0)
    scorer.prefetch(trials, workers=2)
    return request.param, scorer, run_verification(scorer, trials)


def test_service_eer_on_trials_voice(service_run, voice_service):
    channel, scorer, run = service_run
    # Failures to acquire stay within 2 % (issue 16's bound). The VAD's level normalisation, which
    # keeps far-field speech (29 % -> <= 1.8 % refused), takes one telephone recording of libri_367
    # under the 1 s minimum (1.6 -> 0.9 s of net speech): its 6 probe trials and 1 enrolment.
    assert run.fta.rate <= 0.02 and run.fte.rate <= 0.02, (run.fta, run.fte, run.failure_reasons)
    assert set(run.failure_reasons) <= {"enrol:low_net_speech", "probe:low_net_speech"}
    eer = metrics.eer(run.genuine, run.impostor).eer
    print(f"\nservice EER {channel}: {eer:.2%} ({len(run.genuine)} genuine, {len(run.impostor)} impostor trials; "
          f"FTE {run.fte.failures}/{run.fte.attempts})")
    assert eer <= LIMITS[channel]
    outcomes = {t: scorer.outcomes[(subject_for(t.enroll, channel), str(t.probe))]
                for t in (r.trial for r in run.results if r.failure is None)}
    # The report's decisions say the same as the responses (every layer, not the score alone).
    from services.common.evaluation.decisions import verification_decisions

    decided = present(verification_decisions(run))
    assert decided["fmr"]["errors"] == sum(o.match for t, o in outcomes.items() if not t.target)
    assert decided["targets"]["accepted"] == sum(o.match for t, o in outcomes.items() if t.target)
    # The service's own decisions at its calibrated threshold: FMR 1e-3 on all pairs (wideband),
    # 1e-2 (telephone, voice.target_fmr_by_channel). False matches within the 99.5 % binomial
    # bound of the channel's target (2 of 218 at 1e-3, 6 at 1e-2).
    family: ChannelFamily = "telephone" if channel.startswith("telephony") else "wideband"
    target = channel_target_fmr(voice_service.settings.voice, family)
    false_matches = sum(o.match for t, o in outcomes.items() if not t.target)
    genuine_accepted = np.mean([o.match for t, o in outcomes.items() if t.target])
    replay_pass = np.mean([o.spoof_passed for t, o in outcomes.items() if t.target])
    print(f"decisions {channel} (target FMR {target:g}): {false_matches} false matches of {len(run.impostor)}, "
          f"genuine accepted {genuine_accepted:.1%}, genuine through the replay layer {replay_pass:.1%}")
    assert false_matches <= binom.ppf(0.995, len(run.impostor), target)
    assert genuine_accepted >= 0.95
    assert replay_pass >= 0.99  # distinct genuine captures are not taken for replays
