"""The protobuf rendering that the orchestrator (service.py), the review queue (reviews.py) and the
push round trip (push/flow.py) share: factor names, factor sets, a factor's outcome. It imports
none of them, so that each imports it at module level."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

from services.common.api.v1 import mfa_pb2

from .fusion import FactorOutcome
from .reasons import to_protos


def factor_type(name: str) -> mfa_pb2.FactorType:
    key = f"FACTOR_TYPE_{name.upper()}"
    return cast(mfa_pb2.FactorType, mfa_pb2.FactorType.Value(key if key in mfa_pb2.FactorType.keys()
                                                             else "FACTOR_TYPE_UNSPECIFIED"))


def factor_sets(sets: Iterable[Sequence[str]]) -> list[mfa_pb2.FactorSet]:
    return [mfa_pb2.FactorSet(factors=[factor_type(f) for f in s]) for s in sets]


def factor_result(o: FactorOutcome) -> mfa_pb2.FactorResult:
    """A factor's outcome as SubmitFactor answered it, with the operating point that decided it."""
    result = mfa_pb2.FactorResult(factor=factor_type(o.factor), passed=o.passed, veto=o.veto, llr=o.llr,
                                  reasons=to_protos(o.reasons), binding=o.binding)
    for name, value in (("target_fmr", o.target_fmr), ("measured_fmr", o.measured_fmr),
                        ("target_apcer", o.target_apcer), ("measured_apcer", o.measured_apcer)):
        if value is not None:
            setattr(result, name, value)
    return result
