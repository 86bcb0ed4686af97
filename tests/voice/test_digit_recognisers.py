"""A voice service runs the digit recognisers voice.digit_recognisers asks for (how the default is
sized: tests/config/test_digit_recognisers.py), and recognisers running at once hear what one hears.

The test sends challenge Verifies of real spoken digit strings (the held-out speaker of
bench/voice_digits.py, from a seed of its own) one at a time and then all at once, to a voice
service on loopback started with more recognisers and admission slots than one.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench import voice_digits as vd

RECOGNISERS = 3
SEED = 9_100_003  # not the bench's, nor tests/voice/test_digits.py's
STRINGS = 3  # per condition (clean, degraded): 6 wideband strings


@pytest.fixture(scope="module")
def digits_service(tmp_path_factory, voice_models, fixtures_dir):
    """A voice service with RECOGNISERS recognisers, one batcher per model and RECOGNISERS + 1
    admission slots (this machine's cores would admit 2); tenant "digits" without AASIST (the
    speaker and replay layers stay; the challenge is required)."""
    from tests.voice.conftest import own_voice_service

    yield from own_voice_service(tmp_path_factory, "voice-digits", {"admission": {"concurrency": RECOGNISERS + 1}}, {
        "digit_recognisers": RECOGNISERS, "inference_workers": 1, "tenants": {"digits": {"synthetic_speech_check": False}}})


def test_a_service_runs_its_configured_recognisers_and_they_hear_alike_at_once(digits_service, fixtures_dir):
    from services.common.api.v1 import voice_pb2
    from services.common.storage import ChallengeRecord
    from tests.voice.conftest import audited_verifications
    from tests.voice.test_service import enrol, new_subject, verify, wav

    svc = digits_service
    assert svc.engine.digits.workers == RECOGNISERS
    takes = vd.load_takes(fixtures_dir / "voice" / "digits")
    recs = [r for r in vd.recordings(takes, "heldout", STRINGS, SEED) if r.channel == "wideband"]
    tenant, subject = new_subject(svc, "digits")
    enrol(svc, tenant, subject, [r.samples for r in vd.recordings(takes, "heldout", 1, SEED + 1)[:2]])

    def answer(r: vd.Recording) -> voice_pb2.VerifyVoiceResponse:
        ch = svc.rt.storage.challenges.create(ChallengeRecord(
            tenant, subject, "voice_digits", {"digits": r.digits},
            dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60)))
        return verify(svc, tenant, subject, wav(r.samples), nonce=ch.nonce)

    def audited() -> list[dict]:
        return audited_verifications(svc)

    def heard(send) -> list[tuple[bool, bool, int]]:
        """Per recording: the challenge checked and passed, and the digits heard wrongly (from the
        audit record of its Verify, found by the speaker score: each recording scores its own)."""
        before = len(audited())
        replies = send()
        records = audited()[before:]
        out = []
        for reply in replies:
            (record,) = [a for a in records if a["score"] == pytest.approx(reply.score, abs=2e-4)]
            out.append((reply.challenge_checked, reply.challenge_passed, record["layers"]["challenge"]["digit_errors"]))
        return out

    one_at_a_time = heard(lambda: [answer(r) for r in recs])
    assert all(checked for checked, _, _ in one_at_a_time)
    assert sum(passed for _, passed, _ in one_at_a_time) >= len(recs) - 1, one_at_a_time  # 98 % held out
    with ThreadPoolExecutor(len(recs)) as pool:
        at_once = heard(lambda: list(pool.map(answer, recs)))
    assert at_once == one_at_a_time
