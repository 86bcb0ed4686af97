"""Spoken-digit recognition for the digit challenge: PocketSphinx (offline, from its PyPI wheel).

The pocketsphinx wheel carries the CMU US English continuous acoustic model (16 kHz) and the CMU
pronouncing dictionary. The search is a JSGF grammar of exactly ``n`` digit words ("zero"/"oh"
to "nine"), so the recogniser can only answer with a digit string of the challenge's length: a
capture that says anything else comes out as some other digit string and fails the comparison.
Measured accuracy (real, synthetic and telephone speech) is in bench/RESULTS.md.

Decoders are not thread-safe and take ~20 ms to create: a small pool per grammar length.
"""

from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from numpy.typing import NDArray

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_VALUE = {w: i for i, w in enumerate(WORDS)} | {"oh": 0}
SAMPLE_RATE = 16000


def grammar(n: int) -> str:
    digit = " | ".join((*WORDS, "oh"))
    body = " ".join(["<digit>"] * n)
    return f"#JSGF V1.0;\ngrammar digits;\n<digit> = {digit};\npublic <digits> = {body};\n"


class DigitRecognizer:
    def __init__(self, pool_size: int = 2) -> None:
        import pocketsphinx

        model = pocketsphinx.get_model_path()
        self._hmm = os.path.join(model, "en-us", "en-us")
        self._dict = os.path.join(model, "en-us", "cmudict-en-us.dict")
        self._pool_size = pool_size
        self._pools: dict[int, queue.LifoQueue] = {}
        self._lock = threading.Lock()

    def _decoder(self, n: int):
        from pocketsphinx import Config, Decoder

        # Every path holds exactly n digits, so the weights only decide where silence goes: cheaper
        # silence between words (callers pause between digits) and one Viterbi pass (the flat and
        # best-path passes re-ranked towards wrong strings) took espeak-ng digit strings in voices
        # not used to choose this from 12 % to 24 % (telephone 3 % to 12 %), 3.5x faster; the
        # real TIDIGITS recording stays right (bench/RESULTS.md).
        config = Config(hmm=self._hmm, dict=self._dict, samprate=SAMPLE_RATE, loglevel="FATAL",
                        lw=2.0, silprob=0.1, fwdflat=False, bestpath=False)
        decoder = Decoder(config)
        decoder.add_jsgf_string("digits", grammar(n))
        decoder.activate_search("digits")
        return decoder

    @contextmanager
    def _borrow(self, n: int) -> Iterator:
        with self._lock:
            pool = self._pools.setdefault(n, queue.LifoQueue())
        try:
            decoder = pool.get_nowait()
        except queue.Empty:
            decoder = self._decoder(n)
        try:
            yield decoder
        finally:
            if pool.qsize() < self._pool_size:
                pool.put(decoder)

    def recognise(self, samples: NDArray[np.float32], n: int) -> str:
        """The ``n`` digits heard in 16 kHz mono audio, e.g. "471928" ("" when nothing decodes)."""
        pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        with self._borrow(n) as decoder:
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
        if hyp is None:
            return ""
        return "".join(str(_VALUE[w]) for w in hyp.hypstr.split() if w in _VALUE)

    def warmup(self, n: int) -> None:
        self.recognise(np.zeros(SAMPLE_RATE // 2, np.float32), n)
