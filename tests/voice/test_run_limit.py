"""A voice service that admits more calls than voice.max_inline_model_runs lets run the models at once
(the memory bound: bench/RESULTS.md, "Voice memory against admitted calls") completes them all, with
the scores each gets alone, and never runs more than the bound.

The test holds the bound's runs itself (a run of its own on each of the bound's threads, as two calls
inside a model would) while it sends CALLS concurrent Verifies, so that every one of them is admitted
and waits at the bound whatever the machine's speed; then it lets them go.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

BOUND = 2
CALLS = 6  # admitted at once: admission.concurrency


@pytest.fixture(scope="module")
def bounded_service(tmp_path_factory, voice_models, fixtures_dir):
    from tests.voice.conftest import own_voice_service

    yield from own_voice_service(tmp_path_factory, "voice-bounded", {"admission": {"concurrency": CALLS}, "rpc_timeout_s": 300}, {
        "max_inline_model_runs": BOUND, "replay_store": "memory", "tenants": {"bank-a": {"require_challenge": False}}})


def test_calls_beyond_the_bound_wait_and_get_the_scores_of_one_at_a_time(bounded_service, voice_dir):
    from services.common import metrics
    from services.common.api.v1 import common_pb2, voice_pb2
    from tests.voice.conftest import audited_verifications
    from services.common.batching import Inline
    from voice_audio import read, wav_bytes

    svc = bounded_service
    limit = svc.engine.run_limit
    assert limit.limit == BOUND and isinstance(svc.engine.synthetic_batcher, Inline)
    speaker = sorted((voice_dir / "libri_1688").glob("*.wav"), key=lambda p: (-p.stat().st_size, p.name))
    tenant, subject = "bank-a", f"bounded-{uuid.uuid4().hex[:8]}"
    svc.consent(tenant, subject)
    ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)
    svc.stub.Enroll(voice_pb2.EnrollVoiceRequest(subject=ref, utterances=[
        common_pb2.Audio(data=wav_bytes(read(p), 16000)) for p in speaker[:2]]), timeout=300)
    others = [sorted((voice_dir / n).glob("*.wav"))[0] for n in ("libri_2414", "libri_3005", "libri_2033")]
    probes = [wav_bytes(read(p)[: 3 * 16000], 16000) for p in [*speaker[2:5], *others]][:CALLS]

    def verify(data: bytes) -> voice_pb2.VerifyVoiceResponse:
        return svc.stub.Verify(voice_pb2.VerifyVoiceRequest(
            subject=ref, audio=common_pb2.Audio(data=data), channel=voice_pb2.VOICE_CHANNEL_WIDEBAND), timeout=300)

    def scores(replies, records) -> list[tuple[float, float]]:
        """Per reply: the speaker score, and AASIST's from the audit record with that score."""
        out = []
        for reply in replies:
            (record,) = [a for a in records if a["score"] == pytest.approx(reply.score, abs=2e-4)]
            out.append((reply.score, record["layers"]["synthetic"]["score"]))
        return out

    before = len(audited_verifications(svc))
    alone = [verify(p) for p in probes]
    alone_scores = scores(alone, audited_verifications(svc)[before:])
    assert len({s for s, _ in alone_scores}) == CALLS  # each probe is told apart by its own score

    before = len(audited_verifications(svc))
    go = threading.Event()
    with ThreadPoolExecutor(BOUND + CALLS) as pool:
        held = [pool.submit(limit.call, "test", lambda items: go.wait(300) and items, [0]) for _ in range(BOUND)]
        try:
            for _ in range(6000):
                if limit.running == BOUND:
                    break
                time.sleep(0.01)
            futures = [pool.submit(verify, p) for p in probes]
            for _ in range(6000):
                if limit.waiting == CALLS or any(f.done() for f in futures):
                    break
                time.sleep(0.01)
            waiting, running = limit.waiting, limit.running
            gauge = metrics.MODEL_RUNS_WAITING.labels("voice")._value.get()
        finally:
            go.set()
        together = [f.result() for f in futures]
        assert [h.result() for h in held] == [[0]] * BOUND
    assert (waiting, running, gauge) == (CALLS, BOUND, CALLS)  # all admitted at once, none past the bound
    assert scores(together, audited_verifications(svc)[before:]) == alone_scores
    assert [r.score for r in together] == [r.score for r in alone]
    assert limit.most_running == BOUND and limit.waiting == 0 and limit.running == 0
