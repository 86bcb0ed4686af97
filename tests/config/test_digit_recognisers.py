"""voice.digit_recognisers: the Whisper digit recognisers a voice process runs (on the CPU), sized
apart from voice.inference_workers (the micro-batchers per model on a GPU). Unset: one per call the
process admits at a time, at most DIGIT_RECOGNISERS_MAX (memory, bench/RESULTS.md). The service
itself running that many: tests/voice/test_digit_recognisers.py."""

from __future__ import annotations

import pytest

from services.common import config as common_config
from services.settings import load_config
from services.voice.config import DIGIT_RECOGNISERS_MAX, digit_recognisers


@pytest.mark.parametrize("cores, overrides, expected", [
    (2, {}, 2),  # the CPU pod (2 CPUs, one process): as many as when inference_workers (2) set it
    (2, {"voice": {"inference_workers": 1}}, 2),  # the batchers' count no longer sets it
    (4, {"voice": {"inference_workers": 1}}, 4),  # the GPU pod: 4 CPUs, one batcher per model
    (16, {}, DIGIT_RECOGNISERS_MAX),  # one process on 16 cores: capped for memory
    (16, {"server": {"workers": 0}}, 1),  # a process per core: one admitted call each
    (16, {"server": {"voice": {"port": 50052, "workers": 8}}}, 2),
    (16, {"server": {"admission": {"concurrency": 3}}}, 3),  # an explicit concurrency is per process
    (2, {"voice": {"digit_recognisers": 6}}, 6),
    (16, {"voice": {"digit_recognisers": 12}}, 12),  # explicit: past the cap
])
def test_one_recogniser_per_admitted_call_by_default(monkeypatch, cores, overrides, expected):
    monkeypatch.setattr(common_config, "usable_cores", lambda: cores)
    assert digit_recognisers(load_config(None, **overrides)) == expected
