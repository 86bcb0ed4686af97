"""The voice service's enrolment rule, in one place for VoiceService.enroll and the evaluation's local
scorer (services/voice/evaluation.py): the same utterances refused, the same template.

Each utterance must hold ``min_net_speech_enroll_s`` of net speech (checked when it is prepared,
purpose "enroll"); together they must hold ``min_total_net_speech_enroll_s``, so that several short
utterances can add up to one enrolment. An utterance refused by the synthetic-speech layer is left
out; what is kept must still meet both minimums. The template is the normalised mean of the kept
utterances' embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from services.voice.config import VoiceConfig

from .engine import LayerResult
from .pipeline import PreparedAudio


class EnrolmentRefused(Exception):
    def __init__(self, code: str, message: str, metadata: dict[str, str], refused: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.metadata, self.refused = code, message, metadata, list(refused)


@dataclass(frozen=True)
class Kept:
    utterances: list[PreparedAudio]
    refused: list[int] = field(default_factory=list)  # indices left out by the synthetic-speech layer
    net_speech_s: float = 0.0


def check_total_speech(prepared: Sequence[PreparedAudio], cfg: VoiceConfig) -> None:
    total = sum(p.net_speech_s for p in prepared)
    need = cfg.min_total_net_speech_enroll_s
    if total < need:
        raise EnrolmentRefused("LOW_NET_SPEECH", f"{total:.2f} s of net speech over the utterances, {need:g} s needed",
                               {"net_speech_s": f"{total:.2f}", "min_net_speech_s": f"{need:g}"})


def keep_passing(prepared: Sequence[PreparedAudio], layers: Sequence[LayerResult], cfg: VoiceConfig) -> Kept:
    """The utterances the synthetic-speech layer passed; refused (SPOOF_SUSPECTED) when they no
    longer meet the minimums."""
    refused = [i for i, r in enumerate(layers) if not r.passed]
    kept = [p for p, r in zip(prepared, layers, strict=True) if r.passed]
    kept_speech = sum(p.net_speech_s for p in kept)
    if len(kept) < cfg.min_utterances or kept_speech < cfg.min_total_net_speech_enroll_s:
        raise EnrolmentRefused(
            "SPOOF_SUSPECTED", f"{len(refused)} of {len(prepared)} utterances did not pass the anti-spoofing checks; "
                               f"the others hold {kept_speech:.2f} s of net speech",
            {"refused_utterances": ",".join(map(str, refused)), "net_speech_s": f"{kept_speech:.2f}"}, refused)
    return Kept(kept, refused, kept_speech)


def template_of(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    t = np.mean(np.asarray(embeddings), axis=0)
    return (t / np.linalg.norm(t)).astype(np.float32)
