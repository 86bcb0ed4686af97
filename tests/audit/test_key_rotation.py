"""Rotating the audit signing key with the services writing throughout (`biogate audit new-key`,
`switch-key`, then restarts one by one), and key continuity in the trail: each new key introduced
by a record the key before it signed. Real SQLite and PostgreSQL, real key files and a SoftHSM2 token."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest

from services.common.audit import AuditIntegrityError, AuditLog, AuditSigner, verify
from services.common.audit.chain import checkpoint_message, head_message
from services.common.audit.continuity import DESTROYED, INTRODUCED, trail_keys
from services.common.crypto.backend import next_audit_key_file, open_audit_signer, open_next_audit_signer
from services.common.crypto.signing import public_key_pem, raw_public_bytes
from services.common.storage import open_storage
from services.settings import load_config
from tests.audit.test_audit_cli import _run


@pytest.fixture
def settings(tmp_path, storage_dsn):
    return load_config(None, data_dir=str(tmp_path / "data"), storage={"dsn": storage_dsn},
                       audit={"checkpoint_every": 4})


class Replica:
    """One service process: its own storage connection and the audit key it opened at its start."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.storage = open_storage(settings.storage_dsn)
        self.start()

    def start(self) -> None:
        self.log = AuditLog.for_operations(self.settings, self.storage)

    @property
    def key_id(self) -> str:
        return self.log._signer.key_id

    def write(self, n: int, heads: list) -> None:
        for i in range(n):
            self.log.append("face.verify", "svc", "bank-a", details={"decision": "accept", "n": i})
            heads.append(self.storage.audit.head())

    def close(self) -> None:
        self.storage.close()


def _events(storage) -> list[tuple[str, dict]]:
    return [(r.event_type, json.loads(r.details)) for r in storage.audit.iter_records()]


def test_two_replicas_keep_writing_while_the_audit_key_rotates(settings, capsys):
    """A replica still on the old key meets heads the new key signed, and one on the new key heads
    the old key signed, records interleaved: neither refuses (before, the old one failed closed on
    the first head of the new key: every audited call stopped), and the trail verifies with either
    key alone, every head's key introduced by the trail before it signed."""
    old = open_audit_signer(settings)  # made at the first start
    a, b = Replica(settings), Replica(settings)
    heads: list = []
    try:
        a.write(3, heads)
        b.write(3, heads)
        assert _run(settings, ["audit", "new-key"]) == 0
        assert "introduced the next audit key" in capsys.readouterr().out
        new_id = open_audit_signer(settings, create=False).key_id
        assert new_id == old.key_id  # made, introduced, not used yet
        a.write(2, heads)
        assert _run(settings, ["audit", "switch-key"]) == 0
        new = open_audit_signer(settings, create=False)
        assert new.key_id != old.key_id and not next_audit_key_file(settings).exists()
        b.start()  # b restarts first: the new key
        assert (a.key_id, b.key_id) == (old.key_id, new.key_id)
        for _ in range(3):  # one by one: each chains onto the other's head
            b.write(1, heads)
            a.write(1, heads)
        errors: list[BaseException] = []

        def work(replica: Replica) -> None:
            try:
                replica.write(10, [])
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(r,)) for r in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        a.start()  # a restarts: every replica on the new key
        a.write(2, heads)
        assert a.key_id == new.key_id
    finally:
        a.close()
        b.close()

    storage = open_storage(settings.storage_dsn)
    try:
        trail = trail_keys(storage.audit, [new.public_key])
        assert set(trail.keys) == {old.key_id, new.key_id} and trail.problems == []
        introduced = trail.introduced_at[new.key_id]
        assert {h.key_id for h in heads} == {old.key_id, new.key_id}
        assert all(h.seq > introduced for h in heads if h.key_id == new.key_id)
        assert {cp.key_id for cp in storage.audit.checkpoints()} == {old.key_id, new.key_id}
        for configured in (new.public_key, old.public_key):  # no audit.previous_public_keys needed
            report = verify(storage.audit, configured, checkpoint_every=4)
            assert report.ok, report.render()
        events = _events(storage)
        key_events = [(e, d.get("key"), d.get("key_id")) for e, d in events if e.startswith(("keys.", "audit."))]
        assert key_events == [("keys.adding", "audit-signing", None), ("keys.added", "audit-signing", new.key_id),
                              (INTRODUCED, "audit-signing", new.key_id), ("keys.switching", "audit-signing", new.key_id),
                              ("keys.switched", "audit-signing", new.key_id)]
        intro = next(d for e, d in events if e == INTRODUCED)
        assert intro["by"]["key_id"] == old.key_id and "PRIVATE" not in json.dumps(intro)
    finally:
        storage.close()
    assert _run(settings, ["audit", "verify"]) == 0  # the configured key is the new one now
    assert "audit trail: OK" in capsys.readouterr().out


def test_switch_key_is_refused_until_the_trail_introduces_the_next_key(settings, capsys):
    """A next key made but not introduced (new-key stopped between): switching would have the new key
    sign heads no replica trusts. new-key run again introduces the key it finds, makes no other."""
    from services.common.crypto.backend import create_audit_signer

    open_audit_signer(settings)
    assert _run(settings, ["audit", "switch-key"]) == 2
    assert "no next audit signing key" in capsys.readouterr().err
    made = create_audit_signer(settings, next_key=True)
    assert _run(settings, ["audit", "switch-key"]) == 1
    assert "does not introduce the next audit key" in capsys.readouterr().err
    assert next_audit_key_file(settings).exists()  # nothing changed
    assert _run(settings, ["audit", "new-key"]) == 0
    assert f"introduced the next audit key {made.key_id}" in capsys.readouterr().out
    assert _run(settings, ["audit", "new-key"]) == 0
    assert "was introduced at seq" in capsys.readouterr().out
    assert _run(settings, ["audit", "switch-key"]) == 0
    assert open_audit_signer(settings, create=False).key_id == made.key_id


def _forge(storage, attacker, event_type, details, checkpoint_by=None, head_by=None) -> int:
    """An attacker's record chained after the last one (SHA-256 needs no key), with a checkpoint and
    a head signed by keys of their own."""
    text = json.dumps(details, sort_keys=True, separators=(",", ":"))
    seq, h, ts = attacker.forge(storage, event_type, "cli:root", None, None, text)
    if checkpoint_by is not None:
        attacker.execute("INSERT INTO audit_checkpoints (seq, hash, signature, key_id, ts) VALUES (?, ?, ?, ?, ?)",
                         (seq, h, checkpoint_by.sign(checkpoint_message(seq, h, ts)), checkpoint_by.key_id,
                          attacker.ts(ts)))
    if head_by is not None:
        attacker.execute("UPDATE audit_head SET seq = ?, hash = ?, signature = ?, key_id = ?",
                         (seq, h, head_by.sign(head_message(seq, h)), head_by.key_id))
    return seq


def test_an_introduction_needs_both_keys(settings, attacker, tmp_path):
    """Someone who writes the database and holds a key of their own cannot make the services or verify
    trust it: not by introducing it themselves (the current key's checkpoint is missing), nor by
    claiming the current key as its successor (the current key's proof is missing)."""
    from services.common.audit.continuity import introduction_details

    current = open_audit_signer(settings)
    replica = Replica(settings)
    mine = AuditSigner.load_or_create(tmp_path / "attacker.pem")
    try:
        replica.write(3, [])
        # 1. "current introduces mine", checkpoint and head signed by mine
        seq = _forge(replica.storage, attacker, INTRODUCED, introduction_details(mine, current),
                     checkpoint_by=mine, head_by=mine)
        with pytest.raises(AuditIntegrityError, match="nor a key the trail introduces"):
            replica.write(1, [])
        report = verify(replica.storage.audit, current.public_key)
        text = "\n".join(report.problems)
        assert f"seq {seq}: {INTRODUCED} is not vouched for by {current.key_id!r}" in text, report.render()
        assert f"head seq {seq}: signed with unknown key {mine.key_id!r}" in text
    finally:
        replica.close()


def test_a_claimed_predecessor_without_the_successors_proof_is_not_trusted(settings, attacker, tmp_path):
    from services.common.audit.continuity import introduction_details

    current = open_audit_signer(settings)
    replica = Replica(settings)
    mine = AuditSigner.load_or_create(tmp_path / "attacker.pem")
    try:
        replica.write(3, [])
        # 2. "mine introduces current": mine's checkpoint is genuine, the proof cannot be current's
        details = introduction_details(mine, mine)
        details.update(key_id=current.key_id, public_key=introduction_details(current, mine)["public_key"])
        seq = _forge(replica.storage, attacker, INTRODUCED, details, checkpoint_by=mine, head_by=mine)
        with pytest.raises(AuditIntegrityError, match="nor a key the trail introduces"):
            replica.write(1, [])
        text = "\n".join(verify(replica.storage.audit, current.public_key).problems)
        assert f"seq {seq}: {INTRODUCED} carries no valid proof from {current.key_id!r} itself" in text
        assert f"head seq {seq}: signed with unknown key {mine.key_id!r}" in text
    finally:
        replica.close()


def test_a_key_the_trail_never_introduced_is_a_finding_of_its_own(settings, tmp_path, capsys):
    """After a rotation through the trail, a key changed by hand (the earlier key listed in
    audit.previous_public_keys, as before) signs heads the configuration accepts but nothing in the
    trail vouches for: verify reports it, while the signatures themselves check."""
    first, second, replica = _rotated(settings)
    try:
        swapped = AuditSigner.load_or_create(tmp_path / "hand-over.pem")  # the key file replaced by hand
        pem = tmp_path / "second.pub.pem"
        pem.write_bytes(public_key_pem(second.public_key))
        handed = AuditLog(replica.storage.audit, swapped, None, 4, previous_keys=[second.public_key])
        for i in range(5):
            handed.append("face.verify", "svc", "bank-a", details={"n": i})
        report = verify(replica.storage.audit, [swapped.public_key, second.public_key], checkpoint_every=4)
        never = [p for p in report.problems if "which the trail never introduced" in p]
        assert len(never) == 1 and swapped.key_id in never[0], report.render()
        assert len(report.problems) == 1  # each signature verifies: this is the one finding
        # the first key, though never introduced, is the trail's origin: no finding
        assert not any(first.key_id in p for p in report.problems)
    finally:
        replica.close()


def test_a_key_signing_before_the_trail_introduced_it_is_reported(settings, attacker, tmp_path):
    """A key introduced at seq N vouches for nothing before N: a checkpoint of an earlier seq signed
    with it was not signed when the trail says."""
    open_audit_signer(settings)
    replica = Replica(settings)
    try:
        replica.write(5, [])  # a checkpoint at seq 4
        assert _run(settings, ["audit", "new-key"]) == 0
        assert _run(settings, ["audit", "switch-key"]) == 0
        new = open_audit_signer(settings, create=False)
        replica.start()
        replica.write(1, [])
        cp = next(c for c in replica.storage.audit.checkpoints() if c.seq == 4)
        attacker.execute("UPDATE audit_checkpoints SET signature = ?, key_id = ? WHERE seq = 4",
                         (new.sign(checkpoint_message(cp.seq, cp.hash, cp.ts)), new.key_id))
        introduced = trail_keys(replica.storage.audit, new.public_key).introduced_at[new.key_id]
        text = "\n".join(verify(replica.storage.audit, new.public_key).problems)
        assert f"checkpoint seq 4: signed with key {new.key_id!r} before the trail introduced it (seq {introduced})" \
            in text
    finally:
        replica.close()


def test_an_introduction_without_its_checkpoint_is_reported(settings, attacker, capsys):
    open_audit_signer(settings)
    replica = Replica(settings)
    try:
        replica.write(1, [])
        assert _run(settings, ["audit", "new-key"]) == 0
        seq = next(r.seq for r in replica.storage.audit.iter_records() if r.event_type == INTRODUCED)
        attacker.execute("DELETE FROM audit_checkpoints WHERE seq = ?", (seq,))
        text = "\n".join(verify(replica.storage.audit, open_audit_signer(settings).public_key).problems)
        assert f"seq {seq}: {INTRODUCED} has no checkpoint" in text
    finally:
        replica.close()


def test_the_audit_key_rotates_in_the_token(softhsm, tmp_path, capsys):
    """keys.backend pkcs11: the next key is an object of the token (``-audit-next``), the switch
    relabels it ``-audit`` and the old one ``-audit-retired`` (kept: a replica started before signs
    with it until it restarts)."""
    from services.common.crypto.hsm import open_token

    keys = softhsm.keys_config()
    settings = load_config(None, data_dir=str(tmp_path / "data"), keys=keys,
                           storage={"dsn": f"sqlite:///{tmp_path / 'store.db'}"}, audit={"checkpoint_every": 4})
    old = open_audit_signer(settings)
    a, b = Replica(settings), Replica(settings)
    try:
        a.write(2, [])
        assert _run(settings, ["audit", "new-key"]) == 0
        assert _run(settings, ["audit", "switch-key"]) == 0
        b.start()
        assert (a.key_id, b.key_id) == (old.key_id, open_audit_signer(settings, create=False).key_id)
        assert a.key_id != b.key_id
        for _ in range(3):
            a.write(1, [])
            b.write(1, [])
        assert _run(settings, ["audit", "verify"]) == 0
        token = open_token(settings.keys.pkcs11)
        C = token.p11.ObjectClass
        labels = {}
        for which in ("audit", "audit-next", "audit-retired"):
            found = token.find(label=token.label(which), cls=C.PUBLIC_KEY)
            labels[which] = {public_key_pem(token.public_key(o)) for o in found}
        assert labels == {"audit": {public_key_pem(b.log._signer.public_key)}, "audit-next": set(),
                          "audit-retired": {public_key_pem(old.public_key)}}
    finally:
        a.close()
        b.close()


def _rotated(settings) -> tuple:
    """(old, new, a replica restarted onto the new key): the state `audit destroy-key` is for."""
    old = open_audit_signer(settings)
    replica = Replica(settings)
    replica.write(3, [])
    assert _run(settings, ["audit", "new-key"]) == 0
    assert _run(settings, ["audit", "switch-key"]) == 0
    new = open_audit_signer(settings, create=False)
    replica.start()
    replica.write(2, [])
    return old, new, replica


def _destroyed_records(storage) -> list[tuple[int, dict]]:
    return [(r.seq, json.loads(r.details)) for r in storage.audit.iter_records() if r.event_type == DESTROYED]


def test_a_retired_key_file_is_destroyed_audited_and_what_it_signed_still_verifies(settings, capsys):
    """Before, the retired key stayed in its file for good: whoever found it could sign heads and
    checkpoints every verifier accepts. Now `audit destroy-key` destroys it once its successor signs,
    with a record; the trail holds its public key, so verify and the services carry on."""
    from services.common.crypto.backend import retired_audit_key_file

    old, new, replica = _rotated(settings)
    try:
        retired = retired_audit_key_file(settings, old.key_id)
        assert retired.exists()
        capsys.readouterr()
        assert _run(settings, ["audit", "destroy-key", new.key_id]) == 1  # the active key
        assert "is the audit key every process signs with" in capsys.readouterr().err
        assert _run(settings, ["audit", "destroy-key", "not-a-key"]) == 2
        assert "is not an audit key id" in capsys.readouterr().err
        records = replica.storage.audit.last().seq

        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 0
        assert f"destroyed the private key of the retired audit key {old.key_id}" in capsys.readouterr().out
        assert not retired.exists() and open_audit_signer(settings, create=False).key_id == new.key_id
        ((seq, details),) = _destroyed_records(replica.storage)
        assert seq == records + 1 and details == {"key": "audit-signing", "key_id": old.key_id, "backend": "file",
                                                  "how": "file: overwritten and unlinked"}
        row = replica.storage.audit.last()
        assert row.seq == seq and row.actor.startswith("cli:")
        assert seq in {cp.seq for cp in replica.storage.audit.checkpoints()}  # signed, and anchored with the rest

        replica.write(2, [])  # a running service chains on
        Replica(settings).close()  # and one starts
        assert _run(settings, ["audit", "verify"]) == 0
        assert "audit trail: OK" in capsys.readouterr().out
        for configured in (new.public_key, old.public_key):  # the old key's signatures, by its public key
            assert verify(replica.storage.audit, configured, checkpoint_every=4).ok

        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 1  # a second destroy
        assert f"destroyed already ({DESTROYED} at seq {seq})" in capsys.readouterr().err
        assert len(_destroyed_records(replica.storage)) == 1
    finally:
        replica.close()


def test_destroy_key_is_refused_without_a_valid_introduction_or_on_a_trail_that_does_not_verify(
        settings, attacker, capsys):
    """Refused with nothing written or destroyed: a key whose successor's introduction is not valid
    (then the trail does not hold its public key), and any key while the trail does not verify."""
    from services.common.crypto.backend import retired_audit_key_file

    old, new, replica = _rotated(settings)
    try:
        retired = retired_audit_key_file(settings, old.key_id)
        introduced = trail_keys(replica.storage.audit, new.public_key).introduced_at[new.key_id]
        cp = next(c for c in replica.storage.audit.checkpoints() if c.seq == introduced)
        attacker.execute("DELETE FROM audit_checkpoints WHERE seq = ?", (introduced,))
        last = replica.storage.audit.last().seq
        capsys.readouterr()
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 1
        err = capsys.readouterr().err
        assert f"the trail holds no valid {INTRODUCED} in which {old.key_id} vouches for its successor" in err
        assert "nothing was changed" in err and retired.exists() and replica.storage.audit.last().seq == last

        attacker.execute("INSERT INTO audit_checkpoints (seq, hash, signature, key_id, ts) VALUES (?, ?, ?, ?, ?)",
                         (cp.seq, cp.hash, bytes(cp.signature), cp.key_id, attacker.ts(cp.ts)))
        attacker.execute("UPDATE audit_records SET actor = ? WHERE seq = 2", ("cli:someone-else",))
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 1
        out, err = capsys.readouterr()
        assert "seq 2: content does not match its hash" in out
        assert "the audit trail does not verify" in err and "nothing was changed" in err
        assert retired.exists() and replica.storage.audit.last().seq == last and not _destroyed_records(replica.storage)
    finally:
        replica.close()


def test_a_retired_key_is_destroyed_in_the_token(softhsm, tmp_path, capsys):
    """keys.backend pkcs11: the private object of the key labelled ``-audit-retired`` is destroyed;
    its public object stays (it signs nothing). The services start and chain on, verify passes."""
    from services.common.crypto.hsm import open_token

    settings = load_config(None, data_dir=str(tmp_path / "data"), keys=softhsm.keys_config(),
                           storage={"dsn": f"sqlite:///{tmp_path / 'store.db'}"}, audit={"checkpoint_every": 4})
    old, new, replica = _rotated(settings)
    try:
        token = open_token(settings.keys.pkcs11)
        C = token.p11.ObjectClass

        def retired(cls) -> list:
            return token.find(label=token.label("audit-retired"), cls=cls)

        assert len(retired(C.PRIVATE_KEY)) == 1
        capsys.readouterr()
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 0
        assert retired(C.PRIVATE_KEY) == []
        (public,) = retired(C.PUBLIC_KEY)
        assert public_key_pem(token.public_key(public)) == public_key_pem(old.public_key)
        ((_, details),) = _destroyed_records(replica.storage)
        assert details["backend"] == "pkcs11" and details["how"] == "pkcs11: private key object destroyed"
        replica.write(2, [])
        other = Replica(settings)
        other.write(1, [])
        other.close()
        assert _run(settings, ["audit", "verify"]) == 0
        capsys.readouterr()
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 1
        assert "destroyed already" in capsys.readouterr().err
        assert _run(settings, ["audit", "destroy-key", new.key_id]) == 1
    finally:
        replica.close()


def test_a_destruction_that_fails_is_recorded_and_a_run_after_the_cause_is_fixed_destroys_the_key(settings, capsys):
    """A real failure, no mock: the retired key file marked immutable (chattr +i, as a hardening or
    backup tool may leave it) reads, so every refusal check passes, but cannot be opened for
    writing, even by root. The destruction's record is committed first, then the failure's; the
    command exits 1 saying what to do; once the file is mutable again a second run destroys it."""
    from services.common.crypto.backend import retired_audit_key_file

    old, _, replica = _rotated(settings)
    retired = retired_audit_key_file(settings, old.key_id)
    subprocess.run(["chattr", "+i", str(retired)], check=True)
    try:
        capsys.readouterr()
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 1
        err = capsys.readouterr().err
        ((seq, details),) = _destroyed_records(replica.storage)
        assert (f"failed: the trail records the destruction of {old.key_id} at seq {seq}, but it failed "
                "(PermissionError") in err
        assert f"fix that and run `biogate audit destroy-key {old.key_id}` again" in err
        failure = replica.storage.audit.last()
        assert failure.seq == seq + 1 and failure.event_type == "audit.key_destroy_failed"
        assert json.loads(failure.details) == {**details, "error": "PermissionError"}
        assert retired.exists() and open_audit_signer(settings, create=False).key_id != old.key_id
    finally:
        subprocess.run(["chattr", "-i", str(retired)], check=True)
    try:
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 0
        assert not retired.exists()
        assert [s for s, _ in _destroyed_records(replica.storage)] == [seq, seq + 2]
        assert _run(settings, ["audit", "verify"]) == 0
    finally:
        replica.close()


def test_a_signature_by_a_key_after_its_recorded_destruction_is_reported(settings, capsys):
    """A process never restarted onto the new key still holds the destroyed file key in memory and
    signs with it; so would whoever kept a copy. Its signature checks, but comes after the trail
    recorded the key destroyed: verify reports it (before, the trail verified)."""
    open_audit_signer(settings)
    stale = Replica(settings)  # started before the rotation, never restarted
    stale.write(1, [])
    old, _, replica = _rotated(settings)
    try:
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 0
        ((destroyed, _),) = _destroyed_records(replica.storage)
        replica.write(1, [])
        assert _run(settings, ["audit", "verify"]) == 0
        stale.write(1, [])  # signs the head with the destroyed key
        capsys.readouterr()
        assert _run(settings, ["audit", "verify"]) == 1
        head = replica.storage.audit.head()
        assert head.key_id == old.key_id
        assert (f"head seq {head.seq}: signed with key {old.key_id!r} after the trail recorded its destruction "
                f"(seq {destroyed}): a copy of its private key survives") in capsys.readouterr().out
    finally:
        stale.close()
        replica.close()


def test_every_audit_key_operation_is_refused_while_another_holds_the_key_lock(settings, capsys):
    """new-key, switch-key and destroy-key take one lock: before, only destroy-key did, so a
    switch-key could retire the key a destroy-key was checking, or two new-keys each make a key.
    Held by another connection (another operator's command), each is refused with nothing changed."""
    from services.commands.audit import KEY_LOCK
    from services.common.crypto.backend import retired_audit_key_file

    old, new, replica = _rotated(settings)
    assert _run(settings, ["audit", "new-key"]) == 0  # a next key to switch to
    nxt = open_next_audit_signer(settings)
    other = open_storage(settings.storage_dsn)
    try:
        last = replica.storage.audit.last().seq
        capsys.readouterr()
        with other.exclusive(KEY_LOCK, "another operator's audit destroy-key"):
            for argv in (["new-key"], ["switch-key"], ["destroy-key", old.key_id]):
                assert _run(settings, ["audit", *argv]) == 1, argv
                err = capsys.readouterr().err
                assert "refused: another audit key operation runs" in err
                assert "another operator's audit destroy-key" in err and "nothing was changed" in err
            assert open_next_audit_signer(settings).key_id == nxt.key_id
            assert open_audit_signer(settings, create=False).key_id == new.key_id
            assert retired_audit_key_file(settings, old.key_id).exists()
            assert replica.storage.audit.last().seq == last
        assert _run(settings, ["audit", "switch-key"]) == 0  # once the lock is free
        assert open_audit_signer(settings, create=False).key_id == nxt.key_id
    finally:
        other.close()
        replica.close()


def _another_operator_runs_first(monkeypatch, settings, capsys, argv: list[str]) -> dict:
    """The next key command loads whatever it loads before the key lock; then another operator's
    ``argv`` runs whole (taking and releasing the lock); then the first takes the lock: two operators,
    or a retried Job, a moment apart. What the other one printed and returned is in the dict."""
    from services.commands import audit as audit_cli

    real, other = audit_cli._under_key_lock, {}

    def late(storage, what, operation):
        monkeypatch.setattr(audit_cli, "_under_key_lock", real)
        capsys.readouterr()
        other["rc"] = _run(settings, ["audit", *argv])
        other["out"], other["err"] = capsys.readouterr()
        return real(storage, what, operation)

    monkeypatch.setattr(audit_cli, "_under_key_lock", late)
    return other


def test_a_second_switch_key_acts_on_the_key_state_after_the_first(settings, capsys, monkeypatch):
    """Before, switch-key opened the current and the next key before the lock: run again while another
    switched, it audited a switch of keys already switched, signed by the retired key, and failed with
    a traceback. Now it reads the keys under the lock: refused, nothing written, the trail verifies."""
    old, new, replica = _rotated(settings)
    try:
        assert _run(settings, ["audit", "new-key"]) == 0
        nxt = open_next_audit_signer(settings)
        other = _another_operator_runs_first(monkeypatch, settings, capsys, ["switch-key"])
        assert _run(settings, ["audit", "switch-key"]) == 2
        assert other["rc"] == 0 and f"the audit key is now {nxt.key_id}" in other["out"]
        err = capsys.readouterr().err
        assert "refused: " in err and "no next audit signing key" in err and "nothing was changed" in err
        assert open_audit_signer(settings, create=False).key_id == nxt.key_id
        switches = [(e, d["key_id"], d["replaces"]["key_id"]) for e, d in _events(replica.storage)
                    if e.startswith("keys.switch")]
        assert switches[-2:] == [("keys.switching", nxt.key_id, new.key_id), ("keys.switched", nxt.key_id, new.key_id)]
        assert len(switches) == 4  # the first rotation's two and the other operator's two
        assert _run(settings, ["audit", "verify"]) == 0
    finally:
        replica.close()


def test_a_new_key_run_while_another_switches_introduces_its_key_by_the_key_now_current(
        settings, capsys, monkeypatch):
    """Before, new-key opened the current key before the lock: after another operator's switch it made
    the next key and had the retired key vouch for it and sign the introduction. Now the key the
    switch made current introduces it."""
    old, new, replica = _rotated(settings)
    try:
        assert _run(settings, ["audit", "new-key"]) == 0
        nxt = open_next_audit_signer(settings)
        other = _another_operator_runs_first(monkeypatch, settings, capsys, ["switch-key"])
        assert _run(settings, ["audit", "new-key"]) == 0
        assert other["rc"] == 0
        made = open_next_audit_signer(settings)
        assert made.key_id not in (new.key_id, nxt.key_id)
        out = capsys.readouterr().out
        assert f"introduced the next audit key {made.key_id} at seq" in out and f"vouched for by {nxt.key_id}" in out
        intro = [d for e, d in _events(replica.storage) if e == INTRODUCED][-1]
        assert intro["key_id"] == made.key_id and intro["by"]["key_id"] == nxt.key_id
        last = replica.storage.audit.last().seq
        assert {cp.key_id for cp in replica.storage.audit.checkpoints() if cp.seq == last} == {nxt.key_id}
        assert _run(settings, ["audit", "switch-key"]) == 0
        assert _run(settings, ["audit", "verify"]) == 0
    finally:
        replica.close()


def test_a_destroy_key_run_while_another_switches_signs_its_record_with_the_key_now_current(
        settings, capsys, monkeypatch):
    """Before, destroy-key opened the current key before the lock and signed the destruction's record
    and checkpoint with it, though another operator's switch had retired it meanwhile."""
    old, new, replica = _rotated(settings)
    try:
        assert _run(settings, ["audit", "new-key"]) == 0
        nxt = open_next_audit_signer(settings)
        other = _another_operator_runs_first(monkeypatch, settings, capsys, ["switch-key"])
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 0
        assert other["rc"] == 0
        ((seq, _),) = _destroyed_records(replica.storage)
        assert {cp.key_id for cp in replica.storage.audit.checkpoints() if cp.seq == seq} == {nxt.key_id}
        assert _run(settings, ["audit", "verify"]) == 0
    finally:
        replica.close()


def test_a_destroy_key_of_the_key_another_operator_just_retired_sees_it_retired(settings, capsys, monkeypatch):
    """Before, destroy-key read which key is current before the lock and refused the key another
    operator's switch had retired meanwhile as 'the audit key every process signs with'. Now what it
    says is what the token or the files hold once it has the lock."""
    old, new, replica = _rotated(settings)
    try:
        assert _run(settings, ["audit", "new-key"]) == 0
        other = _another_operator_runs_first(monkeypatch, settings, capsys, ["switch-key"])
        assert _run(settings, ["audit", "destroy-key", new.key_id]) == 0
        assert other["rc"] == 0
        assert f"destroyed the private key of the retired audit key {new.key_id}" in capsys.readouterr().out
    finally:
        replica.close()


def test_a_replica_still_on_a_destroyed_key_refuses_to_sign_once_its_check_finds_the_destruction(settings, capsys):
    """A process started before the switch and never restarted holds the destroyed file key in memory.
    Before, it signed on with it and only `audit verify` noticed, afterwards. Now its key check (the
    server runs it every audit.key_check_s) finds the signed `audit.key_destroyed` record, and every
    later append is refused, with nothing written; a replica on the new key is not affected, and the
    trail verifies: nothing was signed by the key after its destruction."""
    from services.common import metrics
    from services.common.audit import AuditKeyDestroyedError

    open_audit_signer(settings)
    stale = Replica(settings)  # started before the rotation, never restarted
    stale.write(1, [])
    old, new, replica = _rotated(settings)
    try:
        assert stale.log.check_key() is None  # retired, not destroyed yet: it may sign on
        stale.write(1, [])
        assert _run(settings, ["audit", "destroy-key", old.key_id]) == 0
        ((destroyed, _),) = _destroyed_records(replica.storage)
        assert replica.log.check_key() is None
        problem = stale.log.check_key()
        assert problem == (f"the audit key {old.key_id} this process signs with was destroyed at seq {destroyed} "
                           "(biogate audit destroy-key); restart this process to load the current key")
        last, refused = replica.storage.audit.last(), metrics.AUDIT_DESTROYED_KEY_REFUSALS._value.get()
        with pytest.raises(AuditKeyDestroyedError) as err:
            stale.write(1, [])
        assert str(err.value) == problem
        assert replica.storage.audit.last() == last and replica.storage.audit.head().seq == last.seq  # nothing written
        assert metrics.AUDIT_DESTROYED_KEY_REFUSALS._value.get() == refused + 1
        assert stale.log.check_key() == problem  # for good: only a restart loads another key
        assert metrics.AUDIT_KEY_DESTROYED._value.get() == 1
        replica.write(2, [])  # the replica on the new key is unaffected
        assert replica.storage.audit.head().key_id == new.key_id
        capsys.readouterr()
        assert _run(settings, ["audit", "verify"]) == 0, capsys.readouterr().out
        stale.start()  # restarted: the current key
        assert stale.key_id == new.key_id and stale.log.check_key() is None
        stale.write(1, [])
    finally:
        stale.close()
        replica.close()


def test_a_destruction_record_no_trusted_key_signed_stops_no_replica(settings, attacker, tmp_path):
    """Someone who can write the database but holds no audit key forges an `audit.key_destroyed`
    record naming the current key, with a checkpoint and head of their own key: the services' key
    check believes only a record whose checkpoint a key the trail trusts signed, so it takes no
    replica down (the forged head stops appends anyway, until verify has been run: the integrity check)."""
    open_audit_signer(settings)
    replica = Replica(settings)
    try:
        replica.write(2, [])
        forger = AuditSigner.load_or_create(tmp_path / "attacker.pem")
        _forge(replica.storage, attacker, DESTROYED, {"key": "audit-signing", "key_id": replica.key_id},
               checkpoint_by=forger)
        assert len(_destroyed_records(replica.storage)) == 1
        assert replica.log.check_key() is None
    finally:
        replica.close()


class Interrupted(BaseException):
    """The switch-key process dying midway (as a kill would; the command lets it through)."""


def _token_labels(settings) -> dict[str, set[bytes]]:
    """The public keys (raw) of the objects, private and public, labelled each audit key label."""
    from services.common.crypto.hsm import open_token

    token = open_token(settings.keys.pkcs11)
    C, A = token.p11.ObjectClass, token.p11.Attribute

    def read() -> dict[str, set[bytes]]:
        out: dict[str, set[bytes]] = {}
        for which in ("audit", "audit-next", "audit-retired"):
            for obj in token.find(label=token.label(which)):
                (public,) = token.find(key_id=bytes(obj[A.ID]), cls=C.PUBLIC_KEY)
                kind = "private" if int(obj[A.CLASS]) == int(C.PRIVATE_KEY) else "public"
                out.setdefault(f"{which} {kind}", set()).add(raw_public_bytes(token.public_key(public)))
        return out

    return token.run(read)


@pytest.mark.parametrize("writes", [1, 2, 3])
def test_a_switch_interrupted_between_its_token_writes_is_finished_by_a_run_again(softhsm, tmp_path, capsys,
                                                                                    monkeypatch, writes):
    """switch-key relabels the next key ``-audit`` (its public object, then its private one), then
    the old one ``-audit-retired`` (the same). Before, interrupted between the two keys, a run again
    found no ``-audit-next`` key and refused ("no next audit signing key"), two keys labelled
    ``-audit`` left and no way on. Now, interrupted after any of its writes, a run again finishes the
    switch, audited; a replica started in between signs with either key and the trail verifies."""
    from services.common.crypto import hsm

    settings = load_config(None, data_dir=str(tmp_path / "data"), keys=softhsm.keys_config(),
                           storage={"dsn": f"sqlite:///{tmp_path / 'store.db'}"}, audit={"checkpoint_every": 4})
    old = open_audit_signer(settings)
    replica = Replica(settings)
    try:
        replica.write(2, [])
        assert _run(settings, ["audit", "new-key"]) == 0
        nxt = open_next_audit_signer(settings)
        real, done = hsm._set_label, list[object]()

        def set_label(*args):
            if len(done) == writes:
                raise Interrupted()
            real(*args)
            done.append(args)

        monkeypatch.setattr(hsm, "_set_label", set_label)
        with pytest.raises(Interrupted):
            _run(settings, ["audit", "switch-key"])
        monkeypatch.setattr(hsm, "_set_label", real)
        capsys.readouterr()
        replica.start()  # a process starting meanwhile takes either key: both are trusted
        assert replica.key_id in (old.key_id, nxt.key_id)
        replica.write(1, [])

        assert _run(settings, ["audit", "switch-key"]) == 0
        assert f"the audit key is now {nxt.key_id}" in capsys.readouterr().out
        assert open_audit_signer(settings, create=False).key_id == nxt.key_id
        new_raw, old_raw = raw_public_bytes(nxt.public_key), raw_public_bytes(old.public_key)
        assert _token_labels(settings) == {"audit private": {new_raw}, "audit public": {new_raw},
                                           "audit-retired private": {old_raw}, "audit-retired public": {old_raw}}
        switches = [(e, d["key_id"], d["replaces"]["key_id"], d.get("finishing", False))
                    for e, d in _events(replica.storage) if e.startswith("keys.switch")]
        finishing = writes >= 2  # the next key's private object relabelled: none is labelled -audit-next
        assert switches == [("keys.switching", nxt.key_id, old.key_id, False),
                            ("keys.switch_failed", nxt.key_id, old.key_id, False),
                            ("keys.switching", nxt.key_id, old.key_id, finishing),
                            ("keys.switched", nxt.key_id, old.key_id, finishing)]
        replica.start()
        replica.write(2, [])
        assert _run(settings, ["audit", "verify"]) == 0
    finally:
        replica.close()


def test_two_keys_labelled_the_audit_key_that_the_trail_does_not_link_are_not_switched(softhsm, tmp_path, capsys):
    """A token with two keys labelled ``-audit`` and no introduction of one by the other (no switch
    of switch-key's): the run is refused, naming both keys, with nothing relabelled or recorded."""
    from services.common.crypto import hsm

    settings = load_config(None, data_dir=str(tmp_path / "data"), keys=softhsm.keys_config(),
                           storage={"dsn": f"sqlite:///{tmp_path / 'store.db'}"}, audit={"checkpoint_every": 4})
    old = open_audit_signer(settings)
    token = hsm.open_token(settings.keys.pkcs11)
    stray = hsm.create_audit_signer(token, which="audit-next")  # never introduced
    hsm._relabel(token, "audit-next", stray._object_id, "audit")
    labels = _token_labels(settings)
    storage = open_storage(settings.storage_dsn)
    try:
        records = len(_events(storage))
        assert _run(settings, ["audit", "switch-key"]) == 2
        err = capsys.readouterr().err
        assert "refused: " in err and "nothing was changed" in err
        assert f"the token labels 2 keys the audit key, {', '.join(sorted([old.key_id, stray.key_id]))}" in err
        assert "introduces none of them by another" in err
        assert _token_labels(settings) == labels and len(_events(storage)) == records
    finally:
        storage.close()
