"""Moved to :mod:`services.common.batching` (shared with the voice service); re-exported here."""

from services.common.batching import BatcherClosed, Inline, MicroBatcher

__all__ = ["BatcherClosed", "Inline", "MicroBatcher"]
