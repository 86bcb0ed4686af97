"""Appending to the audit trail: pseudonymised, checked, hash-chained and signed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from services.common import metrics
from services.common.crypto.signing import PublicKey, load_public_key, verify_signature
from services.common.privacy import Pseudonymizer
from services.common.storage.interfaces import AuditAppend, AuditCheckpoint, AuditHead, AuditRow

from .chain import checkpoint_message, head_message, record_hash
from .continuity import DESTROYED, destroyed_at, destroyed_key, trail_keys
from .guard import AuditDataError, check_details, check_text
from .signing import key_map

if TYPE_CHECKING:
    from services.common.config import CommonSettings
    from services.common.crypto.keyring import Keyring
    from services.common.crypto.signing import Signer
    from services.common.storage.interfaces import AuditRepository, Storage


class AuditIntegrityError(RuntimeError):
    """The trail in the database is not what its signed head says (records added, removed or the
    head changed outside BioGate): nothing is appended on top of it until an operator has run
    ``biogate audit verify`` and dealt with it."""


class AuditKeyDestroyedError(RuntimeError):
    """The trail records the destruction of the key this process signs with: it still holds the
    key in memory (started before `biogate audit switch-key`), but a signature by it after its
    recorded destruction is a finding of `biogate audit verify`. Nothing is appended until restarted."""


class AuditLog:
    """The one writer of audit records. Thread-safe: the storage serialises appends (and commits
    those that wait for one another together)."""

    def __init__(
        self,
        storage_audit: AuditRepository,
        signer: Signer,
        pseudonymizer: Pseudonymizer | None,
        checkpoint_every: int = 100,
        previous_keys: Iterable[PublicKey] = (),
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self._repo = storage_audit
        self._signer = signer
        self._pseudonymize = pseudonymizer
        self._every = checkpoint_every
        # The keys a head may be signed with to be chained onto: this service's and earlier ones', and
        # (looked up when a head names another) those the trail introduces (continuity.py).
        self._configured = {**key_map(list(previous_keys)), signer.key_id: signer.public_key}
        self._head_keys = dict(self._configured)
        # The head this log last signed or verified: found unchanged, its signature needs no second check.
        self._known_head: AuditHead | None = None
        self._destroyed: str | None = None  # why every append is refused: check_key() found the key destroyed

    @classmethod
    def from_settings(cls, settings: CommonSettings, storage: Storage, keyring: Keyring) -> AuditLog:
        from services.common.crypto.backend import open_audit_signer

        return cls(
            storage.audit,
            open_audit_signer(settings, create=False),  # made, audited, by crypto.provision.ensure_keys
            Pseudonymizer(keyring.pseudonym_key()),
            settings.audit.checkpoint_every,
            previous_audit_keys(settings),
        )

    @classmethod
    def for_operations(cls, settings: CommonSettings, storage: Storage, signer: Signer | None = None) -> AuditLog:
        """A log of events without a subject (key operations), usable before the keyring exists:
        the pseudonym key lives in the keyring. A subject id given to it is refused. ``signer``:
        default the configured audit signing key, which must exist."""
        from services.common.crypto.backend import open_audit_signer

        signer = signer or open_audit_signer(settings, create=False)
        return cls(storage.audit, signer, None, settings.audit.checkpoint_every, previous_audit_keys(settings))

    def append(
        self,
        event_type: str,
        actor: str,
        tenant_id: str | None,
        subject_id: str | None = None,
        details: Mapping[str, Any] | None = None,
        checkpoint: bool = False,
    ) -> AuditRow:
        """Write one event. Raises AuditDataError (and writes nothing) if it would carry
        personal or biometric data; the subject id is stored only as its keyed pseudonym.
        ``checkpoint``: sign a checkpoint at this record whatever ``checkpoint_every`` says."""
        if self._destroyed is not None:
            metrics.AUDIT_DESTROYED_KEY_REFUSALS.inc()
            raise AuditKeyDestroyedError(self._destroyed)
        if not event_type:
            raise AuditDataError("event_type is required")
        for what, text in (("event_type", event_type), ("actor", actor), ("tenant_id", tenant_id)):
            check_text(what, text)
        details_json = check_details(details)
        pseudonym = None
        if subject_id:
            if self._pseudonymize is None:
                raise AuditDataError("this audit log writes events without a subject (no pseudonym key)")
            pseudonym = self._pseudonymize(tenant_id or "", subject_id)

        def build(next_seq: int, prev_hash: str | None) -> AuditAppend:
            if (prev_hash is None) != (next_seq == 1):
                raise RuntimeError(f"audit storage gave seq {next_seq} with prev_hash {prev_hash!r}")
            ts = datetime.now(timezone.utc)
            digest = record_hash(next_seq, ts, event_type, actor, tenant_id, pseudonym, details_json, prev_hash)
            row = AuditRow(next_seq, ts, event_type, actor, tenant_id, pseudonym, details_json, prev_hash, digest)

            def head() -> AuditHead:
                signed = AuditHead(next_seq, digest, self._signer.sign(head_message(next_seq, digest)),
                                   self._signer.key_id)
                self._known_head = signed
                return signed

            signed = None
            if checkpoint or next_seq % self._every == 0:
                signed = AuditCheckpoint(
                    next_seq, digest, self._signer.sign(checkpoint_message(next_seq, digest, ts)), self._signer.key_id, ts
                )
            return AuditAppend(row, checkpoint=signed, sign_head=head)

        return self._repo.append(build, self._check_tail)

    def check_key(self) -> str | None:
        """Why this log refuses every append from now on, or None: the trail records the destruction
        of the key it signs with. Run every ``audit.key_check_s`` by the server. One seek of the
        partial index of the ``audit.key_destroyed`` records; a record is believed only when a key
        the trail trusts signed its checkpoint (as `audit verify` does), so that a row written into
        the database by someone without an audit key cannot stop the services."""
        if self._destroyed is not None:
            return self._destroyed
        mine = self._signer.key_id
        if not any(destroyed_key(row) == mine for row, _ in self._repo.checkpointed(DESTROYED)):
            return None
        seq = destroyed_at(self._repo, trail_keys(self._repo, self._configured.values())).get(mine)
        if seq is not None:
            self._destroyed = (f"the audit key {mine} this process signs with was destroyed at seq {seq} (biogate "
                               "audit destroy-key); restart this process to load the current key")
            metrics.AUDIT_KEY_DESTROYED.set(1)
        return self._destroyed

    def _check_tail(self, head: AuditHead | None, last_seq: int, last_hash: str | None) -> None:
        """Refuses to chain onto records its signed head does not name: the next head's signature would
        cover them, and a forged record (its hash needs no key) or a truncation would verify."""
        if head is None:
            if last_seq:
                raise AuditIntegrityError(
                    f"the audit trail ends at seq {last_seq} but has no signed head: it was altered outside "
                    "BioGate; nothing is appended until `biogate audit verify` has been run and the trail restored"
                )
            return
        where = f"the audit trail's signed head is at seq {head.seq}"
        if head.seq != last_seq or head.hash != last_hash:
            found = f"ends at seq {last_seq}" if head.seq > last_seq else (
                f"seq {head.seq + 1}..{last_seq} are not covered by the signed head" if head.seq < last_seq
                else "names another hash than the last record has")
            raise AuditIntegrityError(
                f"{where}, but the trail {found}: records were added or removed outside BioGate; nothing is "
                "appended until `biogate audit verify` has been run and the trail restored"
            )
        if head == self._known_head:
            return
        key = self._head_keys.get(head.key_id)
        if key is None:  # a key changed by `biogate audit new-key`: the trail introduces it (runs once a key)
            self._head_keys.update(trail_keys(self._repo, self._configured.values()).keys)
            key = self._head_keys.get(head.key_id)
        if key is None:
            raise AuditIntegrityError(
                f"{where}, signed with key {head.key_id!r}, neither this service's audit key "
                f"{self._signer.key_id!r}, nor one of audit.previous_public_keys, nor a key the trail introduces "
                "(`biogate audit new-key`): the head was replaced, or the audit key changed by hand; restore the key "
                "from its backup, or add the earlier key's public PEM (`biogate audit export-public-key` before the "
                "change, or the anchors) to audit.previous_public_keys once `biogate audit verify --public-key` with "
                "it passes"
            )
        if not verify_signature(key, bytes(head.signature), head_message(head.seq, head.hash)):
            raise AuditIntegrityError(
                f"{where}, but its signature does not verify: the head was altered outside BioGate; nothing "
                "is appended until `biogate audit verify` has been run and the trail restored"
            )
        self._known_head = head


def previous_audit_keys(settings: CommonSettings) -> list[PublicKey]:
    """The public keys of ``audit.previous_public_keys``; a file that is no such key stops the start."""
    keys = []
    for path in settings.audit.previous_public_keys:
        try:
            keys.append(load_public_key(path.read_bytes()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"audit.previous_public_keys: {path} is not a readable Ed25519 or P-256 public key "
                             f"PEM ({type(exc).__name__})") from None
    return keys


__all__ = ["AuditLog", "AuditDataError", "AuditKeyDestroyedError", "AuditIntegrityError", "previous_audit_keys"]
