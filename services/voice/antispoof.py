"""Synthetic-speech layer: AASIST on the most speech-dense window of a prepared clip.

Cost is what decides the setting here: AASIST on its native 4.04 s window took about 0.9 s of one
CPU core, 3 s about 0.6 s and 2 s about 0.3 s (it grows faster than the window). One window placed
where the VAD found the most speech separates genuine fixture speech from espeak-ng speech, where a
window at the start of the clip (often silence) does not; see bench/voice_antispoof_dev.py.
The length is set per channel: on telephone audio the native 4.04 s window separates espeak-ng
from genuine speech clearly better than 3 s (bench/RESULTS.md). Windows are scored in batches
(one pass per length), so concurrent requests share forward passes.

``cut_digital_silence`` (voice.antispoof_cut_digital_silence, per channel family): before the window
is placed, every run of >= 20 ms within one PCM-16 step of zero is removed (digital-zero pauses, as
in a digit answer joined from takes or espeak-ng's own pauses, push AASIST towards "spoof"). The
score is then another quantity (its name says so), so it needs a record fitted with the cut
(bench/voice_antispoof_refit.py; bench/RESULTS.md, "Cutting digital silence before AASIST").
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .aasist import AasistDetector
from .pipeline import PreparedAudio

FloatArray = NDArray[np.float32]
SAMPLE_RATE = 16000
DIGITAL_SILENCE = 1.0 / 32768  # one PCM-16 step: zeros after decoding, DC blocking and resampling
MIN_DIGITAL_SILENCE = 320  # 20 ms at 16 kHz
Segments = tuple[tuple[int, int], ...]


def digital_silence_runs(samples: FloatArray) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Starts and ends of the runs of >= 20 ms (at 16 kHz) with |x| <= one PCM-16 step."""
    quiet = np.concatenate([[False], np.abs(samples) <= DIGITAL_SILENCE, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    long = ends - starts >= MIN_DIGITAL_SILENCE
    return starts[long], ends[long]


def without_digital_silence(samples: FloatArray, segments: Segments = ()) -> tuple[FloatArray, Segments]:
    """Every run of digital silence (:func:`digital_silence_runs`) removed, the VAD segments moved
    onto what is left (the clip unchanged when nothing, or everything, would be removed)."""
    x = np.asarray(samples, dtype=np.float32)
    starts, ends = digital_silence_runs(x)
    if not len(starts):
        return x, tuple(segments)
    keep = np.ones(len(x) + 1, np.int64)
    for start, end in zip(starts, ends, strict=True):
        keep[start:end] = 0
    if not keep[:-1].any():
        return x, tuple(segments)
    before = np.concatenate([[0], np.cumsum(keep[:-1])])  # kept samples before each index
    moved = ((int(before[min(max(s, 0), len(x))]), int(before[min(max(e, 0), len(x))])) for s, e in segments)
    return x[keep[:-1].astype(bool)], tuple((s, e) for s, e in moved if e > s)


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
    def __init__(self, detector: AasistDetector, window_s: float = 3.0, cut_digital_silence: bool = False) -> None:
        self.detector = detector
        self.window = min(int(round(window_s * SAMPLE_RATE)), detector.window)
        self.cut_digital_silence = cut_digital_silence

    def window_of(self, prepared: PreparedAudio) -> FloatArray:
        samples, segments = prepared.samples, prepared.vad.segments
        if self.cut_digital_silence:
            samples, segments = without_digital_silence(samples, segments)
        return speech_window(samples, segments, self.window)

    def score_windows(self, windows: list[FloatArray]) -> list[float]:
        """Bona fide log-odds (higher = genuine) of windows; those of one length share a forward pass
        (the channels' windows may differ in length)."""
        scores = [0.0] * len(windows)
        for length in {len(w) for w in windows}:
            idx = [i for i, w in enumerate(windows) if len(w) == length]
            logits = self.detector.logits(np.stack([windows[i] for i in idx]))
            for i, v in zip(idx, logits[:, 1] - logits[:, 0], strict=True):
                scores[i] = float(v)
        return scores

    def score(self, prepared: PreparedAudio) -> float:
        return self.score_windows([self.window_of(prepared)])[0]
