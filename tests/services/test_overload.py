"""Overload sheds instead of collapsing (issue 12: at 4x its sustained rate the face service passed
20 % of that rate, 55 % of calls waited out their deadline, RESOURCE_EXHAUSTED came after 3.9 s).

The real face service in its own process on loopback, with admission control as shipped; the 1x
rate is measured in the same run (a closed loop), then 4x that rate is offered as an open loop
with deadlines (bench/overload.py, the benchmark's own code). Only ratios are asserted: of the 1x
rate, of the deadline."""

from __future__ import annotations

import numpy as np
import pytest

from bench.harness import ServiceProcess
from bench.overload import face_config, face_workload, overload
from services.common.server.admission import DEADLINE_UNREACHABLE, QUEUE_FULL

FACTOR = 4.0
DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def run(fixtures_dir):
    with ServiceProcess("face", face_config()) as svc:
        stub_class, verify, cheap = face_workload(svc, subjects=4)
        yield overload(svc, stub_class, verify, cheap, factor=FACTOR, base_s=8.0, over_s=12.0,
                       deadline_s=DEADLINE_S, warm_s=2.0, idle_after_s=0.0)


def test_four_times_the_sustained_rate_still_passes_most_of_that_rate_within_the_deadline(run):
    assert run["base"]["rate_per_s"] > 0 and not run["base"]["errors"] and not run["base"]["refused"]
    over = run["over"]
    assert over["offered_per_s"] >= 3.5 * run["base"]["rate_per_s"]
    # The acceptance target is 90 % (bench/RESULTS.md, 40 s runs). These short runs on 2 shared cores,
    # where the load generator and every refusal take CPU from the service, passed 68-92 % of 1x with
    # admission control (9 runs of 8-12 s, one a CI run at 68 %) and 17-30 % without it: 55 tells the
    # two apart without failing on a loaded machine.
    assert run["passed_pct_of_1x"] >= 55, over


def test_the_excess_is_refused_at_once_with_resource_exhausted_and_a_retry_hint(run):
    outcomes = run["outcomes"]
    refused = [o for o in outcomes if o.code != "OK"]
    assert {o.code for o in refused} == {"RESOURCE_EXHAUSTED"}  # no DEADLINE_EXCEEDED, no INTERNAL
    assert len(refused) >= 0.4 * len(outcomes)  # 4x the capacity: most of it cannot be served
    assert all(o.reason in (QUEUE_FULL, DEADLINE_UNREACHABLE) for o in refused)
    assert all(o.retry_delay_s is not None and o.retry_delay_s > 0 for o in refused)
    latencies = np.array([o.latency_s for o in refused])
    assert np.percentile(latencies, 50) <= 0.05 * DEADLINE_S
    assert np.percentile(latencies, 90) <= 0.1 * DEADLINE_S


def test_cheap_rpcs_and_health_are_not_starved(run):
    for name, calls in run["cheap"].items():
        assert calls["ok"] >= 10 and calls["failed"] == 0, (name, calls)
        assert calls["p99_ms"] <= 0.25 * DEADLINE_S * 1000, (name, calls)
