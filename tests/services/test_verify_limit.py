"""The per-subject bound on failed verifications (services/common/modality/attempts.py) on a real
runtime and database, without models: a genuine attempt writes nothing, a failure is counted, and
the subject's attempts still running count as failures, so a burst in one process cannot pass the
bound while concurrent attempts below it are not refused (other processes see an attempt once it
has failed)."""

from __future__ import annotations

from contextlib import ExitStack

import grpc
import pytest

from services.common.config import VerifyLimit
from services.common.errors import ServiceError
from services.common.modality.attempts import VerifyLimiter
from services.common.runtime import Runtime
from tests.conftest import make_settings
from tests.ops.samples import Counted


@pytest.fixture()
def limiter(tmp_path):
    rt = Runtime.open(make_settings(tmp_path / "data"))
    yield VerifyLimiter(rt, "face", VerifyLimit(failures=3, window_s=3600), {})
    rt.storage.close()


def refused(limiter: VerifyLimiter, subject: str) -> ServiceError:
    with pytest.raises(ServiceError) as err, limiter.attempt("bank-a", subject):
        pass
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "VERIFY_LIMITED"
    return err.value


def test_matches_write_nothing_and_failures_reach_the_bound(limiter):
    key = limiter.key("bank-a", "s-1")
    for _ in range(5):
        with limiter.attempt("bank-a", "s-1"):
            pass  # a match: not marked failed
    assert limiter.rt.storage.rate_limits.count(key, 3600) == 0
    for _ in range(3):
        with limiter.attempt("bank-a", "s-1") as attempt:
            attempt.failed = True
    assert limiter.rt.storage.rate_limits.count(key, 3600) == 3
    assert int(refused(limiter, "s-1").metadata["retry_after_s"]) > 0
    with limiter.attempt("bank-a", "s-2"):  # another subject is not touched
        pass


def test_attempts_running_at_once_count_toward_the_bound_and_only_up_to_it(limiter):
    with limiter.attempt("bank-a", "s-1") as attempt:
        attempt.failed = True
    with ExitStack() as running:  # one failure and two running reach the bound of 3: a third is refused
        for _ in range(2):
            running.enter_context(limiter.attempt("bank-a", "s-1"))
        refusals = Counted("biogate_verify_limited_total", modality="face")
        assert "still running" in refused(limiter, "s-1").message
        assert refusals.delta == 1
    with limiter.attempt("bank-a", "s-1"):  # they answered (matches): room again
        pass
    assert limiter.rt.storage.rate_limits.count(limiter.key("bank-a", "s-1"), 3600) == 1


def test_an_error_inside_an_attempt_counts_nothing(limiter):
    for _ in range(4):
        with pytest.raises(RuntimeError), limiter.attempt("bank-a", "s-1"):
            raise RuntimeError("the comparison failed to run")
    assert limiter.rt.storage.rate_limits.count(limiter.key("bank-a", "s-1"), 3600) == 0
