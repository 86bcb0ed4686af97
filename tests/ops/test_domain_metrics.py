"""The domain metrics are recorded where their events happen: the MFA's decisions and factor
outcomes (a real orchestrator on SQLite), its circuit breakers (an injected clock), the
micro-batchers, and the voice service's refusals. Values are read from the process's registry as a
scrape would see them, as differences, since other tests in the process add to the same series."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest

from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.batching import MicroBatcher
from services.mfa import subjects
from services.mfa.clients import CircuitBreaker
from services.voice.engine import LayerResult, SpeakerResult, VoiceDecision
from services.voice.metrics import record_verification
from services.common.context import SYSTEM
from tests.mfa.conftest import App, Clock, outbox_codes, settings_for
from tests.ops.samples import Counted, value


@pytest.fixture
def orch(tmp_path):
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    settings = settings_for(tmp_path)
    prepare(settings)
    rt = Runtime.open(settings)
    o = Orchestrator(rt, clock=Clock())
    yield o
    o.close()
    rt.close()


def test_decisions_and_factor_outcomes_are_counted_once_each(orch):
    ref = common_pb2.SubjectRef(tenant_id="otp-bank", subject_id="cust-ops-1")
    subjects.set_phone_number(orch.rt, mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"), caller=SYSTEM)
    s = orch.start(mfa_pb2.StartAuthenticationRequest(subject=ref, channel=mfa_pb2.CHANNEL_APP, action="login",
                                                      device=App().device), caller=SYSTEM)
    failed = Counted("biogate_mfa_factor_outcomes_total", factor="sms_otp", result="failed")
    passed = Counted("biogate_mfa_factor_outcomes_total", factor="sms_otp", result="passed")
    step_up = Counted("biogate_mfa_decisions_total", outcome="step_up", source="decide")
    allowed = Counted("biogate_mfa_decisions_total", outcome="allow", source="decide")

    assert orch.decide(mfa_pb2.DecideRequest(session_id=s.session_id), caller=SYSTEM).outcome == mfa_pb2.OUTCOME_STEP_UP
    orch.send_otp(mfa_pb2.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    code = outbox_codes(orch.rt.settings)[-1]
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    assert not orch.submit(mfa_pb2.SubmitFactorRequest(session_id=s.session_id, otp=mfa_pb2.OtpEvidence(code=wrong)), caller=SYSTEM).result.passed
    assert orch.submit(mfa_pb2.SubmitFactorRequest(session_id=s.session_id, otp=mfa_pb2.OtpEvidence(code=code)), caller=SYSTEM).result.passed
    assert orch.decide(mfa_pb2.DecideRequest(session_id=s.session_id), caller=SYSTEM).outcome == mfa_pb2.OUTCOME_ALLOW
    assert orch.decide(mfa_pb2.DecideRequest(session_id=s.session_id), caller=SYSTEM).outcome == mfa_pb2.OUTCOME_ALLOW  # replayed

    assert (failed.delta, passed.delta, step_up.delta, allowed.delta) == (1, 1, 1, 1)


def test_the_breaker_state_is_read_at_scrape_time_and_its_transitions_counted():
    clock = [0.0]
    breaker = CircuitBreaker(2, 10.0, lambda: clock[0], service="ops-probe")

    def state() -> dict[str, float]:
        return {s: value("biogate_mfa_breaker_state", service="ops-probe", state=s)
                for s in ("closed", "open", "half_open")}

    def entered(s: str) -> float:
        return value("biogate_mfa_breaker_transitions_total", service="ops-probe", state=s)

    assert state() == {"closed": 1, "open": 0, "half_open": 0}
    breaker.failure()
    breaker.failure()
    assert state() == {"closed": 0, "open": 1, "half_open": 0} and entered("open") == 1
    clock[0] = 10.0  # no call yet: the clock alone makes it half-open
    assert state() == {"closed": 0, "open": 0, "half_open": 1}
    assert breaker.allow() and entered("half_open") == 1
    breaker.failure()
    assert state()["open"] == 1 and entered("open") == 2
    clock[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert state() == {"closed": 1, "open": 0, "half_open": 0} and entered("closed") == 1
    assert b'biogate_mfa_breaker_state{service="ops-probe",state="closed"} 1.0' in generate_latest(REGISTRY)


def test_a_batcher_records_its_batch_sizes_and_each_model_call():
    release = threading.Event()

    def double(items: list[int]) -> list[int]:
        release.wait(5)
        return [2 * i for i in items]

    batches = Counted("biogate_batch_size_count", model="ops-double")
    items = Counted("biogate_batch_size_sum", model="ops-double")
    calls = Counted("biogate_inference_seconds_count", model="ops-double")
    batcher = MicroBatcher(double, max_batch=4, max_wait_ms=0.0, name="ops-double-0", model="ops-double")
    try:
        futures = [batcher.submit_async(i) for i in range(6)]
        release.set()
        assert [f.result(5) for f in futures] == [0, 2, 4, 6, 8, 10]
    finally:
        batcher.close()
    assert items.delta == 6 and batches.delta == batcher.batches >= 2 and calls.delta == batcher.batches


def voice_decision(family: str, synthetic: bool, replay: bool, challenge: bool) -> VoiceDecision:
    return VoiceDecision("ecapa", family, SpeakerResult(0.7, 0.5, 3.0, 0.01), LayerResult(True, synthetic, 1.0),
                         LayerResult(True, replay, 0.1), LayerResult(True, challenge, 0))


def test_voice_refusals_are_counted_by_layer_and_channel_family():
    spoof = Counted("biogate_voice_spoof_refusals_total", rpc="verify", channel="telephone")
    replay = Counted("biogate_voice_replay_refusals_total", channel="telephone")
    challenge = Counted("biogate_voice_challenge_failures_total", channel="telephone")
    record_verification(voice_decision("telephone", synthetic=False, replay=True, challenge=True))
    record_verification(voice_decision("telephone", synthetic=True, replay=False, challenge=False))
    record_verification(voice_decision("telephone", synthetic=True, replay=True, challenge=True))
    assert (spoof.delta, replay.delta, challenge.delta) == (1, 1, 1)


def test_scores_go_to_buckets_suited_to_cosine_similarity():
    from services.common.metrics import SCORE_BUCKETS, observe_similarity

    assert SCORE_BUCKETS[-1] == 1.0 and SCORE_BUCKETS[0] == 0.0 and np.all(np.diff(SCORE_BUCKETS) > 0)
    assert sum(0.2 <= b <= 0.8 for b in SCORE_BUCKETS) >= 10  # where genuine and impostor scores meet
    below = Counted("biogate_similarity_score_bucket", model="ops-m", channel="default", result="match", le="0.45")
    above = Counted("biogate_similarity_score_bucket", model="ops-m", channel="default", result="match", le="0.5")
    observe_similarity("ops-m", "default", 0.47, True)
    assert (below.delta, above.delta) == (0, 1)
