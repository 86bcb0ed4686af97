"""Voice activity: Silero VAD v6 (ONNX) at 16 kHz, whole clips or streamed chunk by chunk.

The network is recurrent: it takes 512-sample windows with the previous window's last 64 samples
as context and carries a (2, 1, 128) state. :class:`VadStream` keeps that state and the partial
window across ``push`` calls, so streaming a clip in 20 ms pieces gives exactly the probabilities,
segments and net speech of the whole clip. Segmentation follows silero-vad's
``get_speech_timestamps`` (threshold with hysteresis, minimum speech and silence durations); net
speech is the total length of the segments before any padding.

Level normalisation: the network's speech probability falls with the level, so quiet and far-field
speech (a phone on the table, a meeting room) lost most of its net speech. Each window is scaled
to ``level_target_dbfs`` by a causal gain that follows the loudest recent window (instant attack,
release of ``release_db_per_s``) within +-``max_gain_db``: speech keeps its level relative to the
pauses around it, and the gain depends on the windows so far only, so a stream and a whole clip
still give the same probabilities. Only the VAD sees the gain; the audio that is embedded and
scored is unchanged (bench/voice_gates_eval.py measured the choice).

The gain's instant attack has a cost: a short word after silence is all onset, and boosting its
quiet first window by up to ``max_gain_db`` drives the network's state so far that the word that
follows reads as noise (isolated spoken digits lost all their speech). The normalisation is there
to find speech the network misses at a low level, never to lose speech it hears as is; so by
default (``as_is_too``) each window is also scored as recorded, in the same batched run with its
own state, and the larger probability counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from services.common.inference import create_session

SAMPLE_RATE = 16000
WINDOW = 512
CONTEXT = 64


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    neg_threshold: float | None = None  # default threshold - 0.15, as silero-vad
    min_speech_ms: float = 250.0
    min_silence_ms: float = 100.0
    level_target_dbfs: float | None = -20.0  # None: no level normalisation (grid chosen in bench/voice_gates_eval.py)
    max_gain_db: float = 30.0
    max_cut_db: float = 30.0  # the most the input is turned down (as calibrated with AASIST)
    release_db_per_s: float = 6.0
    as_is_too: bool = True  # with normalisation: speech where either input holds it (module docstring)


@dataclass(frozen=True)
class VadResult:
    segments: tuple[tuple[int, int], ...]  # (start, end) sample indices at 16 kHz
    speech_s: float  # net speech
    duration_s: float


class SileroVad:
    def __init__(self, model_path: str | os.PathLike[str], params: VadParams = VadParams(),
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        # One thread: the network is tiny and runs one window at a time.
        self.model = create_session(model_path, providers=providers, intra_op_threads=1)
        self.params = params

    def stream(self) -> VadStream:
        return VadStream(self)

    def __call__(self, samples: NDArray[np.float32]) -> VadResult:
        s = self.stream()
        s.push(samples)
        return s.finish()

    def _step(self, windows: NDArray[np.float32], state: NDArray[np.float32]) -> tuple[float, NDArray[np.float32]]:
        """The largest speech probability of ``windows`` (one row per input, each with its own
        slice of ``state``, shape (2, rows, 128))."""
        prob, state = self.model.session.run(
            None, {"input": windows, "state": state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)}
        )
        return float(np.max(prob)), state


class VadStream:
    """Incremental VAD over a 16 kHz stream; ``speech_s`` is safe to act on at any point."""

    def __init__(self, vad: SileroVad) -> None:
        self._vad = vad
        p = vad.params
        self._hi = p.threshold
        self._lo = p.neg_threshold if p.neg_threshold is not None else max(p.threshold - 0.15, 0.01)
        self._min_speech = SAMPLE_RATE * p.min_speech_ms / 1000
        self._min_silence = SAMPLE_RATE * p.min_silence_ms / 1000
        self._target = None if p.level_target_dbfs is None else 10 ** (p.level_target_dbfs / 20)
        self._as_is_too = self._target is not None and p.as_is_too
        self._state = np.zeros((2, 2 if self._as_is_too else 1, 128), np.float32)
        self._max_gain = 10 ** (p.max_gain_db / 20)
        self._min_gain = 10 ** (-p.max_cut_db / 20)
        self._release = 10 ** (-p.release_db_per_s / 20 * WINDOW / SAMPLE_RATE)
        self._level = 0.0  # the level followed (RMS of the loudest recent window)
        self._buf = np.zeros(CONTEXT, np.float32)  # context + not yet processed samples
        self._samples = 0  # total pushed
        self._windows = 0  # windows processed
        self._triggered = False
        self._start = 0
        self._temp_end = 0
        self._segments: list[tuple[int, int]] = []
        self.probs: list[float] = []

    @property
    def duration_s(self) -> float:
        return self._samples / SAMPLE_RATE

    @property
    def speech_s(self) -> float:
        """Net speech so far: closed segments plus an open one already longer than the minimum."""
        total = sum(e - s for s, e in self._segments)
        if self._triggered:
            open_len = (self._temp_end or self._windows * WINDOW) - self._start
            if open_len > self._min_speech:
                total += open_len
        return total / SAMPLE_RATE

    def push(self, samples: NDArray[np.float32]) -> None:
        if len(samples) == 0:
            return
        self._samples += len(samples)
        self._buf = np.concatenate([self._buf, np.asarray(samples, dtype=np.float32)])
        n = (len(self._buf) - CONTEXT) // WINDOW
        for i in range(n):
            chunk = self._buf[i * WINDOW : i * WINDOW + CONTEXT + WINDOW]
            prob, self._state = self._vad._step(self._inputs(chunk), self._state)
            self._advance(prob)
        self._buf = self._buf[n * WINDOW :]

    def _inputs(self, chunk: NDArray[np.float32]) -> NDArray[np.float32]:
        normalised = self._normalised(chunk)
        return np.stack([normalised, chunk]) if self._as_is_too else normalised[None, :]

    def _normalised(self, chunk: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._target is None:
            return chunk
        rms = float(np.sqrt(np.mean(np.square(chunk[CONTEXT:], dtype=np.float64))))
        self._level = max(rms, self._level * self._release)
        if self._level <= 0.0:
            return chunk
        gain = min(max(self._target / self._level, self._min_gain), self._max_gain)
        return (chunk * np.float32(gain)).astype(np.float32)

    def finish(self) -> VadResult:
        """Close the stream (the last partial window is zero-padded, as silero-vad does)."""
        rest = len(self._buf) - CONTEXT
        if rest > 0:
            window = np.concatenate([self._buf, np.zeros(WINDOW - rest, np.float32)])
            prob, self._state = self._vad._step(self._inputs(window), self._state)
            self._advance(prob)
            self._buf = self._buf[:CONTEXT]
        if self._triggered and self._samples - self._start > self._min_speech:
            self._segments.append((self._start, self._samples))
        self._triggered = False
        segments = tuple(self._segments)
        return VadResult(segments, sum(e - s for s, e in segments) / SAMPLE_RATE, self.duration_s)

    def _advance(self, prob: float) -> None:
        cur = self._windows * WINDOW
        self._windows += 1
        self.probs.append(prob)
        if prob >= self._hi:
            self._temp_end = 0
            if not self._triggered:
                self._triggered, self._start = True, cur
            return
        if prob < self._lo and self._triggered:
            if not self._temp_end:
                self._temp_end = cur
            if cur - self._temp_end >= self._min_silence:
                if self._temp_end - self._start > self._min_speech:
                    self._segments.append((self._start, self._temp_end))
                self._triggered, self._temp_end = False, 0
