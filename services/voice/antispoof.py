"""Synthetic-speech layer: AASIST on the speech of a prepared clip only (VAD segments joined).

What AASIST sees is the clip's speech, with its non-speech removed: ASVspoof 2019 LA models use
silence, and how long it lasts, as a cue to the class (Müller et al. 2021, "Speech is Silver,
Silence is Golden"), so a genuine answer with digital-zero pauses between its words (a phone
app's or an IVR's capture of a caller saying digits) looked synthetic to the window that scored
the clip as it came (bench/RESULTS.md, "AASIST on speech only"). A clip whose speech is shorter
than the window is scored at its own length, not tiled (a tiled window repeats the joins).

Cost decides the window's length: AASIST on its native 4.04 s window took about 0.9 s of one
CPU core, 3 s about 0.6 s and 2 s about 0.3 s (it grows faster than the window). The length is
set per channel (bench/RESULTS.md). Windows are scored in batches (one pass per length), so
concurrent requests share forward passes.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .aasist import AasistDetector
from .pipeline import PreparedAudio

FloatArray = NDArray[np.float32]
SAMPLE_RATE = 16000
FADE = 80  # 5 ms cross-fade at each join: a hard cut would be a click no genuine capture has
MIN_SPEECH = SAMPLE_RATE // 2  # below this the clip is scored as it came (the verify minimum is higher)


def speech_only(samples: FloatArray, segments: tuple[tuple[int, int], ...]) -> FloatArray:
    """The VAD segments of ``samples`` joined with short cross-fades, non-speech removed; the
    clip itself when the segments hold under ``MIN_SPEECH`` samples."""
    x = np.asarray(samples, dtype=np.float32)
    parts = [x[max(s, 0) : min(e, len(x))] for s, e in segments if min(e, len(x)) > max(s, 0)]
    if sum(len(p) for p in parts) < MIN_SPEECH:
        return x
    out = parts[0]
    ramp = np.linspace(0.0, 1.0, FADE, dtype=np.float32)
    for p in parts[1:]:
        n = min(FADE, len(out), len(p))
        if n == 0:
            continue
        r = ramp if n == FADE else np.linspace(0.0, 1.0, n, dtype=np.float32)
        mixed = out[-n:] * (1 - r) + p[:n] * r
        out = np.concatenate([out[:-n], mixed, p[n:]])
    return out.astype(np.float32)


def speech_window(samples: FloatArray, segments: tuple[tuple[int, int], ...], length: int) -> FloatArray:
    """At most ``length`` samples of the clip's speech (:func:`speech_only`), from its middle;
    shorter speech is returned whole (scored at its own length)."""
    speech = speech_only(samples, segments)
    if len(speech) <= length:
        return speech
    start = (len(speech) - length) // 2
    return speech[start : start + length]


class SyntheticSpeechDetector:
    def __init__(self, detector: AasistDetector, window_s: float = 3.0) -> None:
        self.detector = detector
        self.window = min(int(round(window_s * SAMPLE_RATE)), detector.window)

    def window_of(self, prepared: PreparedAudio) -> FloatArray:
        return speech_window(prepared.samples, prepared.vad.segments, self.window)

    def score_windows(self, windows: list[FloatArray]) -> list[float]:
        """Bona fide log-odds (higher = genuine) of windows; those of one length share a forward pass
        (the channels' windows and short clips' speech differ in length)."""
        scores = [0.0] * len(windows)
        for length in {len(w) for w in windows}:
            idx = [i for i, w in enumerate(windows) if len(w) == length]
            logits = self.detector.logits(np.stack([windows[i] for i in idx]))
            for i, v in zip(idx, logits[:, 1] - logits[:, 0]):
                scores[i] = float(v)
        return scores

    def score(self, prepared: PreparedAudio) -> float:
        return self.score_windows([self.window_of(prepared)])[0]
