"""Synthetic-speech layer: AASIST on the most speech-dense window of a prepared clip.

Cost is what decides the setting here: AASIST on its native 4.04 s window took about 0.9 s of one
CPU core, 3 s about 0.6 s and 2 s about 0.3 s (it grows faster than the window). One window placed
where the VAD found the most speech separates genuine fixture speech from espeak-ng speech, where a
window at the start of the clip (often silence) does not; see bench/voice_antispoof_dev.py.
The length is set per channel: on telephone audio the native 4.04 s window separates espeak-ng
from genuine speech clearly better than 3 s (bench/RESULTS.md). Windows are scored in batches
(one pass per length), so concurrent requests share forward passes.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .aasist import AasistDetector
from .pipeline import PreparedAudio

FloatArray = NDArray[np.float32]
SAMPLE_RATE = 16000


def speech_window(samples: FloatArray, segments: tuple[tuple[int, int], ...], length: int) -> FloatArray:
    """The ``length``-sample window holding the most VAD speech (tiled when the clip is shorter)."""
    x = np.asarray(samples, dtype=np.float32)
    if len(x) <= length:
        return np.tile(x, length // max(len(x), 1) + 1)[:length]
    mask = np.zeros(len(x) + 1, np.int64)
    for start, end in segments:
        mask[max(start, 0)] += 1
        mask[min(end, len(x))] -= 1
    speech = np.cumsum(mask[:-1]) > 0
    csum = np.concatenate([[0], np.cumsum(speech)])
    covered = csum[length:] - csum[: len(x) - length + 1]
    # Among equally covered windows, the one closest to the middle of the speech.
    best = np.flatnonzero(covered == covered.max())
    start = int(best[len(best) // 2])
    return x[start : start + length]


class SyntheticSpeechDetector:
    def __init__(self, detector: AasistDetector, window_s: float = 3.0) -> None:
        self.detector = detector
        self.window = min(int(round(window_s * SAMPLE_RATE)), detector.window)

    def window_of(self, prepared: PreparedAudio) -> FloatArray:
        return speech_window(prepared.samples, prepared.vad.segments, self.window)

    def score_windows(self, windows: list[FloatArray]) -> list[float]:
        """Bona fide log-odds (higher = genuine) of windows; those of one length share a forward pass
        (the channels' windows may differ in length)."""
        scores = [0.0] * len(windows)
        for length in {len(w) for w in windows}:
            idx = [i for i, w in enumerate(windows) if len(w) == length]
            logits = self.detector.logits(np.stack([windows[i] for i in idx]))
            for i, v in zip(idx, logits[:, 1] - logits[:, 0]):
                scores[i] = float(v)
        return scores

    def score(self, prepared: PreparedAudio) -> float:
        return self.score_windows([self.window_of(prepared)])[0]
