"""The push confirmations' sealed fields in the MFA's sessions, as key rotation re-wraps them and key
retirement counts them (services/common/crypto/rotation.py, `biogate keys`).

A confirmation's fields are sealed under the primary of the moment and kept, base64, in its
session's state (``push.sealed``) until they are answered. Every stored session's fields are
re-wrapped and counted, the expired ones' too: an expired session is kept (retention.sessions_s, and
while a review holds it) until `biogate purge` deletes it, and no row the keyring can no longer open
is left behind a `keys retire` that claims success.
A re-wrap is a compare-and-swap on the session row's version, as every write of the MFA's is: when
the MFA changes the session in between, its write stands and the re-wrap's swap fails (the next pass
sees the session as it is now); when the re-wrap lands first, the MFA's compare-and-swap fails and
:meth:`services.mfa.sessions.Sessions.mutate` re-applies its change to the re-wrapped state.
"""

from __future__ import annotations

import base64
import binascii
import copy
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.crypto.rotation import SealedTable, sealed_key_id
from services.common.storage import ConcurrentUpdateError, NotFoundError

if TYPE_CHECKING:
    from ..storage import AuthSessionRecord, MfaStore

WHAT = "push confirmation"


@dataclass(frozen=True)
class SealedConfirmation:
    session: AuthSessionRecord  # as read: its version is the compare-and-swap's
    envelope: bytes


class SealedConfirmations:
    def __init__(self, store: MfaStore) -> None:
        self.repo = store.auth_sessions

    def _pages(self, batch: int, after: str) -> Iterator[tuple[list[SealedConfirmation], bool]]:
        """(the sealed confirmations of a page of stored sessions, whether more pages follow)."""
        while True:
            rows = self.repo.sealed_after(after, batch)
            found = []
            for row in rows:
                push = row.state.get("push") or {}
                if push.get("sealed"):
                    found.append(SealedConfirmation(row, _decoded(push["sealed"])))
            yield found, len(rows) == batch
            if len(rows) < batch:
                return
            after = rows[-1].id

    def fetch(self, exclude_key_id: str, batch: int, after: str | None) -> list[SealedConfirmation]:
        """The next sealed confirmations, in session id order after ``after``, not under ``exclude_key_id``."""
        for found, more in self._pages(batch, after or ""):
            todo = [c for c in found if sealed_key_id(c.envelope) != exclude_key_id]
            if todo or not more:
                return todo
        return []

    def swap(self, rec: SealedConfirmation, envelope: bytes) -> bool:
        """Compare-and-swap: the session's fields replaced if the session is still at the version read."""
        state = copy.deepcopy(dict(rec.session.state))
        state["push"]["sealed"] = base64.b64encode(envelope).decode()
        try:
            self.repo.update(rec.session.id, rec.session.version, state)
        except (ConcurrentUpdateError, NotFoundError):
            return False
        return True

    def key_usage(self, batch: int = 500) -> Counter[str]:
        """Sealed confirmations in stored sessions (expired ones too) per key id (``keys retire`` counts them)."""
        return Counter(sealed_key_id(c.envelope) for found, _ in self._pages(batch, "") for c in found)

    def sealed_table(self) -> SealedTable:
        """The confirmations as ``keys rotate`` and ``keys rewrap`` re-wrap them."""
        return SealedTable(WHAT, self.fetch, lambda rec: rec.session.id, self.swap)


def _decoded(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""  # not an envelope: the re-wrap reports it, counted under no key
