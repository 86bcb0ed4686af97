"""Reading the process's metrics as a scrape would see them."""

from __future__ import annotations

from prometheus_client import REGISTRY


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counted:
    """The change of a sample from now on."""

    def __init__(self, name: str, **labels: str) -> None:
        self.name, self.labels, self.start = name, labels, value(name, **labels)

    @property
    def delta(self) -> float:
        return value(self.name, **self.labels) - self.start
