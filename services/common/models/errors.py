"""Errors of the model store. Every message names the model (and file) it is about."""

from __future__ import annotations


class ModelError(Exception):
    """Base of the model store's errors."""


class ManifestError(ModelError, ValueError):
    """models/manifest.yaml is malformed; the message lists every problem with its model id and field."""


class UnknownModelError(ModelError, KeyError):
    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class ModelUnavailableError(ModelError):
    """A model file is not in the cache (or is damaged there); the message says how to fetch it."""


class FetchError(ModelError):
    """At least one file could not be obtained from any of its sources."""


class SourceUnavailable(ModelError):
    """One source could not deliver a file; the store goes on with the next source."""
