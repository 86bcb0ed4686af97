"""The voice service's domain metrics (the shared ones are in services/common/metrics.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter

if TYPE_CHECKING:
    from services.voice.engine import VoiceDecision

SPOOF_REFUSALS = Counter("biogate_voice_spoof_refusals_total",
                         "Utterances AASIST refused as synthetic speech, by RPC and channel family", ["rpc", "channel"])
REPLAY_REFUSALS = Counter("biogate_voice_replay_refusals_total",
                          "Verifications refused as a replay of an accepted capture, by channel family", ["channel"])
REPLAY_UNREADABLE = Counter("biogate_voice_replay_records_unreadable_total",
                            "Retained replay fingerprints left out of a replay check as expired, by reason "
                            "(key_retired: sealed under a key the keyring no longer holds)", ["reason"])
CHALLENGE_FAILURES = Counter("biogate_voice_challenge_failures_total",
                             "Verifications whose spoken digits did not answer the challenge, by channel family",
                             ["channel"])


def record_verification(decision: VoiceDecision) -> None:
    if decision.synthetic.checked and not decision.synthetic.passed:
        SPOOF_REFUSALS.labels("verify", decision.family).inc()
    if decision.replay.checked and not decision.replay.passed:
        REPLAY_REFUSALS.labels(decision.family).inc()
    if decision.challenge.checked and not decision.challenge.passed:
        CHALLENGE_FAILURES.labels(decision.family).inc()
