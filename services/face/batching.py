"""Moved to :mod:`services.common.batching` (shared with the voice service); re-exported here."""

from services.common.batching import BatcherClosed, MicroBatcher

__all__ = ["BatcherClosed", "MicroBatcher"]
