"""Machine-readable reasons attached to risk assessments, factor results and decisions."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.api.v1 import common_pb2


@dataclass(frozen=True)
class Reason:
    code: str  # UPPER_SNAKE, stable: relying parties and reviewers act on it
    message: str = ""

    def to_proto(self) -> common_pb2.Reason:
        return common_pb2.Reason(code=self.code, message=self.message)

    def to_json(self) -> list[str]:
        return [self.code, self.message]

    @classmethod
    def from_json(cls, item) -> "Reason":
        return cls(str(item[0]), str(item[1]))


def to_protos(reasons) -> list[common_pb2.Reason]:
    return [r.to_proto() for r in reasons]


def unique(reasons) -> tuple[Reason, ...]:
    """The first reason of each code, in order: a failure reported by a service, by its factor and
    by the decision is one reason to a relying party (LIVENESS_FAILED was listed twice)."""
    first: dict[str, Reason] = {}
    for r in reasons:
        first.setdefault(r.code, r)
    return tuple(first.values())
