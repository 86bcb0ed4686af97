"""voice.max_inline_model_runs: ECAPA and AASIST runs at a time in a voice process on the CPU, on as
many threads of their own (services/common/batching.py RunLimit)."""

from __future__ import annotations

import pytest

from services.common import config as common_config
from services.settings import load_config
from services.voice.config import INLINE_MODEL_RUNS_MAX, inline_model_runs


@pytest.mark.parametrize("cores, overrides, expected", [
    (2, {}, 2),  # the CPU pod (2 CPUs, one process): its two admitted calls run at once
    (16, {}, INLINE_MODEL_RUNS_MAX),  # one process on 16 cores: capped for memory
    (16, {"server": {"workers": 4}}, 4),
    (16, {"server": {"workers": 0}}, 1),  # a process per core
    (16, {"server": {"admission": {"concurrency": 3}}}, 3),
    (16, {"voice": {"max_inline_model_runs": 8}}, 8),  # explicit: past the cap
])
def test_inline_model_runs_one_per_admitted_call_at_most_the_cap(monkeypatch, cores, overrides, expected):
    """voice.max_inline_model_runs (ECAPA and AASIST runs at a time on the CPU): unset, one per call
    the process admits, at most INLINE_MODEL_RUNS_MAX (bench/RESULTS.md, "Voice memory against admitted
    calls"). The service waiting at the bound: tests/voice/test_run_limit.py."""
    monkeypatch.setattr(common_config, "usable_cores", lambda: cores)
    assert inline_model_runs(load_config(None, **overrides)) == expected
