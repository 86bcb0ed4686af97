"""Key operations that race each other: two `keys rotate` at once, a `keys retire` while rotations
run, the loser of a race seen from the command line. Each backend (the file keyring, a PKCS#11
token in SoftHSM2) on each storage (SQLite, PostgreSQL).

The interleavings are forced, not hoped for: a rotation is stopped at a hook between computing a
batch of re-wrapped envelopes and the transaction that swaps them in (the window in which another
process acts), the competitor runs to its end or to its own hook on another thread or in another
process, and only then does the first go on. Threads and processes reach the storage through
connections of their own, as separate processes would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import yaml

from services.common.config import PROJECT_ROOT
from services.common.audit import AuditDataError, AuditLog
from services.common.crypto import EnvelopeCrypto, KeyringError, LocalKeyring, StaticKeyring
from services.common.crypto.signing import FileSigner
from services.common.privacy import Pseudonymizer
from services.common.crypto.rotation import key_operation, key_usage, retire, rotate
from services.common.storage import open_storage
from tests.crypto.conftest import Backend
from tests.crypto.test_rotation import _check_all, _seed

R = TypeVar("R")


class _Hooked:
    """A storage whose first write transaction (a rotation's first swap: the batch is already
    re-wrapped, nothing written) first calls ``hook``."""

    def __init__(self, storage, hook: Callable[[], None]) -> None:
        self._storage, self._hook, self.fired = storage, hook, False

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def transaction(self):
        if not self.fired:
            self.fired = True
            self._hook()
        return self._storage.transaction()


def _attempt(work: Callable[[], R]) -> R | Exception:
    try:
        return work()
    except Exception as exc:  # the outcome the assertions look at
        return exc


def _in_thread(work: Callable[[], object]) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.__setitem__("result", _attempt(work)))
    t.start()
    return t, out


def _refused_as_in_progress(outcome: object) -> bool:
    return isinstance(outcome, KeyringError) and "in progress" in str(outcome)


@pytest.fixture
def stores(storage_dsn):
    opened = [open_storage(storage_dsn) for _ in range(3)]  # rotation A, rotation B, retire
    yield opened
    for st in opened:
        st.close()


def test_two_rotations_at_once_end_with_one_primary_wrapping_every_record(stores, backend):
    st_a, st_b, _ = stores
    keyring_a = backend.open()
    expected = _seed(st_a, EnvelopeCrypto(keyring_a), 12)
    b: dict = {}

    def race() -> None:  # A has added its key and re-wrapped its first batch: B rotates meanwhile
        t, out = _in_thread(lambda: rotate(st_b, backend.open(), batch=5))
        t.join(120)
        b.update(out)

    report_a = rotate(_Hooked(st_a, race), keyring_a, batch=5)
    final = backend.open()
    assert [k.key_id for k in final.keys() if k.primary] == [final.primary_key_id()]
    _check_all(st_a, EnvelopeCrypto(final), expected)
    # Every record is under the one primary: `keys retire` of every other key is possible.
    assert set(key_usage(st_a)) == {final.primary_key_id()}, (report_a.target_key_id, b)
    # One rotation won; the other was refused with a clear error and added no key.
    assert report_a.ok and report_a.target_key_id == final.primary_key_id()
    assert _refused_as_in_progress(b["result"]), b
    assert len(final.keys()) == 2


def test_retire_between_two_rotations_never_removes_a_key_a_record_is_swapped_to(stores, backend):
    """Rotation A re-wraps a batch to its key kA and stops before the swap; rotation B adds kB (kA
    is no longer the primary) and stops before its swap; `keys retire kA` finds no record under
    kA. Unserialised, the retire destroys kA and A's swap then moves the batch under it."""
    st_a, st_b, st_c = stores
    keyring_a = backend.open()
    expected = _seed(st_a, EnvelopeCrypto(keyring_a), 12)
    b_stopped, b_go = threading.Event(), threading.Event()
    outcome: dict = {}

    def b_hook() -> None:
        b_stopped.set()
        b_go.wait(120)

    def rotation_b():
        try:
            return rotate(_Hooked(st_b, b_hook), backend.open(), batch=5)
        finally:
            b_stopped.set()  # refused, or done

    def race() -> None:
        k_a = backend.open().primary_key_id()
        b_thread, outcome["b"] = _in_thread(rotation_b)
        outcome["b_thread"] = b_thread
        b_stopped.wait(120)
        c_thread, outcome["retire"] = _in_thread(lambda: retire(st_c, backend.open(), k_a))
        c_thread.join(120)
        b_go.set()

    report_a = _attempt(lambda: rotate(_Hooked(st_a, race), keyring_a, batch=5))
    outcome["b_thread"].join(120)
    final = backend.open()
    _check_all(st_a, EnvelopeCrypto(final), expected)  # every envelope still opens
    assert set(key_usage(st_a)) <= {k.key_id for k in final.keys()}
    assert not isinstance(report_a, Exception) and report_a.ok, report_a
    assert _refused_as_in_progress(outcome["b"]["result"]), outcome["b"]
    assert _refused_as_in_progress(outcome["retire"]["result"]), outcome["retire"]


def _write_config(tmp_path, storage_dsn: str, backend: Backend):
    config = tmp_path / "biogate.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "keys": backend.keys_config, "storage": {"dsn": storage_dsn},
        "models": {"cache_dir": str(PROJECT_ROOT / "var" / "models")},
    }))  # fmt: skip
    return config


def test_the_losing_command_says_why_in_one_line(stores, backend, storage_dsn, tmp_path):
    """`biogate keys rotate` and `keys retire`, real processes, while a rotation is under way:
    refused with one line naming the cause, no trace, nothing changed."""
    st_a = stores[0]
    keyring_a = backend.open()
    first = keyring_a.primary_key_id()
    expected = _seed(st_a, EnvelopeCrypto(keyring_a), 6)
    config = _write_config(tmp_path, storage_dsn, backend)
    env = dict(os.environ, **backend.env)
    runs: dict = {}

    def race() -> None:
        for what in (["rotate"], ["retire", first]):
            runs[what[0]] = subprocess.run(
                [sys.executable, "-m", "services.cli", "--config", str(config), "keys", *what],
                env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
        runs["keys"] = len(backend.open().keys())

    report = rotate(_Hooked(st_a, race), keyring_a, batch=4)
    assert report.ok
    assert runs["keys"] == 2, runs  # the first key and the running rotation's, none of the loser's
    for name in ("rotate", "retire"):
        run = runs[name]
        assert run.returncode == 1, (name, run.stdout, run.stderr)
        err = run.stderr.strip()
        said = [line for line in err.splitlines() if not line.startswith("{")]  # besides JSON log lines
        assert "Traceback" not in err and len(said) == 1, (name, err)
        assert said[0].startswith("refused: ") and "in progress" in said[0], (name, err)
    final = backend.open()
    _check_all(st_a, EnvelopeCrypto(final), expected)
    assert set(key_usage(st_a)) == {final.primary_key_id()} and first in {k.key_id for k in final.keys()}


def test_a_killed_key_operation_leaves_no_lock_behind(storage_dsn):
    """The lock belongs to the holder's connection or open file: a rotation killed midway (kill -9,
    a lost host) does not block the next one."""
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys\n"
            "from services.common.storage import open_storage\n"
            "from services.common.crypto.rotation import key_operation\n"
            f"with key_operation(open_storage({storage_dsn!r}), 'rotate'):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read()\n"
        )],
        cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    st = open_storage(storage_dsn)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(KeyringError, match=f"in progress.*pid {holder.pid}"):
            with key_operation(st, "retire"):
                pass
        holder.kill()
        holder.wait(60)
        with key_operation(st, "retire"), key_operation(st, "rotate"):  # free now, and re-entrant
            pass
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(60)
        st.close()


def test_retire_writes_its_audit_record_only_with_the_removal(stores, tmp_path):
    """The usage count, the audit record and the removal are one transaction: a keyring that
    refuses the removal (here the read-only keyring of $BIOGATE_KEYRING_JSON) leaves no record
    of a retirement that did not happen, an audit record that cannot be written leaves the key,
    and a retirement that happens leaves exactly one record."""
    st = stores[0]
    file_keyring = LocalKeyring(tmp_path / "keyring.json")
    old = file_keyring.primary_key_id()
    file_keyring.add_key()
    audit = AuditLog(st.audit, FileSigner.load_or_create(tmp_path / "audit.pem"),
                     Pseudonymizer(file_keyring.pseudonym_key()))

    def record(info) -> None:
        audit.append("keys.retire", actor="test", tenant_id=None, details={"key_id": info.key_id})

    with pytest.raises(KeyringError, match="read-only"):
        retire(st, StaticKeyring(file_keyring.dump_json()), old, audit=record)
    assert [r.event_type for r in st.audit.iter_records()] == []

    def unavailable(info) -> None:
        raise AuditDataError("the audit record cannot be written")

    with pytest.raises(AuditDataError):  # no audit record, no removal
        retire(st, file_keyring, old, audit=unavailable)
    assert old in {k.key_id for k in LocalKeyring(tmp_path / "keyring.json").keys()}
    retire(st, file_keyring, old, audit=record)
    assert [(r.event_type, json.loads(r.details)) for r in st.audit.iter_records()] == [("keys.retire", {"key_id": old})]


def test_a_key_operation_that_ended_lets_the_next_one_in_at_once(storage_dsn):
    """An operator's rotate followed at once by retire (or a script doing both) must find the lock
    free. On PostgreSQL the session advisory lock used to be left to the closing connection, which
    releases it only when the server's backend has exited, after close() returned: the next
    operation, on another connection, then failed now and then with "another key operation is in
    progress" (seen in test_rotation). 200 back-to-back operations, each on a connection of its own."""
    storage = open_storage(storage_dsn)
    try:
        for i in range(200):
            with key_operation(storage, "rotate" if i % 2 else "retire"):
                pass
    finally:
        storage.close()
