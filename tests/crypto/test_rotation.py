"""Rotation on real SQLite and PostgreSQL storage, with services reading and writing meanwhile."""

import os
import random
import threading

import pytest

from services.common.crypto import (
    EnvelopeCrypto,
    KeyInUseError,
    LocalKeyring,
    TemplateBinding,
    UnknownKeyError,
    envelope_key_id,
)
from services.common.crypto.rotation import key_usage, retire, rewrap_all, rotate
from services.common.storage import TemplateRecord, open_storage
from tests.crypto.conftest import Pinned


@pytest.fixture
def storage(storage_dsn):
    st = open_storage(storage_dsn)
    yield st
    st.close()


def _binding(i: int) -> TemplateBinding:
    if i % 2:
        return TemplateBinding("bank-a", f"cust-{i}", "voice", "ecapa-v1", "telephone")
    return TemplateBinding("bank-a", f"cust-{i}", "face", "arcface-r100")


def _put(storage, crypto, b: TemplateBinding, content: bytes, replace: bool = False) -> None:
    env = crypto.encrypt_template(b, content)
    storage.templates.put(
        TemplateRecord(b.tenant_id, b.subject_id, b.modality, b.model_id, b.channel, env, envelope_key_id(env), 3),
        replace=replace,
    )


def _read(storage, crypto, b: TemplateBinding) -> bytes:
    rec = storage.templates.get(b.tenant_id, b.subject_id, b.modality, b.model_id, b.channel)
    return crypto.decrypt_template(b, rec.envelope)


def _seed(storage, crypto, n: int) -> dict:
    expected: dict = {}
    for i in range(n):
        b = _binding(i)
        expected[b] = os.urandom(64)
        _put(storage, crypto, b, expected[b])
        if i % 3 == 0:
            phone = f"+86138{i:08d}"
            storage.subjects.set_phone(b.tenant_id, b.subject_id, crypto.encrypt_contact(b.tenant_id, b.subject_id, phone), crypto.keyring.primary_key_id())
            expected[("phone", b.subject_id)] = phone
    return expected


def _check_all(storage, crypto, expected: dict) -> None:
    for k, want in expected.items():
        if isinstance(k, TemplateBinding):
            assert _read(storage, crypto, k) == want, k
        else:
            env, _ = storage.subjects.get_phone("bank-a", k[1])
            assert crypto.decrypt_contact("bank-a", k[1], env) == want


def test_rotate_rewraps_everything_and_retire_rules(storage, tmp_path):
    keyring = LocalKeyring(tmp_path / "keyring.json")
    crypto = EnvelopeCrypto(keyring)
    old = keyring.primary_key_id()
    expected = _seed(storage, crypto, 25)
    n_phones = sum(1 for k in expected if not isinstance(k, TemplateBinding))

    with pytest.raises(KeyInUseError):
        retire(storage, keyring, old)

    report = rotate(storage, keyring, cipher="SM4-GCM", batch=4)
    new = keyring.primary_key_id()
    assert report.ok and report.target_key_id == new != old
    assert (report.templates_rewrapped, report.phones_rewrapped) == (25, n_phones)
    assert key_usage(storage) == {new: 25 + n_phones}
    _check_all(storage, crypto, expected)

    # Nothing left to do: a second pass is a no-op.
    again = rewrap_all(storage, keyring, batch=4)
    assert (again.templates_rewrapped, again.phones_rewrapped, again.conflicts) == (0, 0, 0)

    retire(storage, keyring, old)
    assert old not in [k.key_id for k in keyring.keys()]
    _check_all(storage, crypto, expected)
    with pytest.raises(UnknownKeyError):
        retire(storage, keyring, old)


def test_rotation_while_services_read_and_write(storage, backend):
    service = EnvelopeCrypto(backend.open(check_interval_s=0.1))  # the running service's keyring instance
    admin = backend.open()  # the operator's `keys rotate`
    old = admin.primary_key_id()
    expected = _seed(storage, service, 40)
    lock = threading.Lock()
    stop, stop_writing, read_after_retire = threading.Event(), threading.Event(), threading.Event()
    errors: list[str] = []
    reads = [0]
    retired_at: list[int] = []  # the read count when the old key was retired

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while not stop.is_set():
                b = _binding(rnd.randrange(40))
                _read(storage, service, b)  # must never fail, whichever key it is under
                reads[0] += 1
                if retired_at and reads[0] >= retired_at[0] + 20:
                    read_after_retire.set()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"reader: {type(exc).__name__}: {exc}")

    def writer() -> None:
        rnd = random.Random(7)
        i = 1000
        try:
            while not stop_writing.is_set():
                if rnd.random() < 0.5:  # re-enrolment of an existing subject
                    b = _binding(rnd.randrange(40))
                    content = os.urandom(64)
                    _put(storage, service, b, content, replace=True)
                else:  # a new enrolment
                    b, content = _binding(i), os.urandom(64)
                    i += 1
                    _put(storage, service, b, content)
                with lock:
                    expected[b] = content
        except Exception as exc:  # noqa: BLE001
            errors.append(f"writer: {type(exc).__name__}: {exc}")

    readers = [threading.Thread(target=reader, args=(s,)) for s in (1, 2)]
    writing = threading.Thread(target=writer)
    for t in [*readers, writing]:
        t.start()
    try:
        report = rotate(storage, admin, batch=5)
        # A couple more rounds of traffic under the new primary before stopping.
        report2 = rewrap_all(storage, admin, batch=5)
        stop_writing.set()
        writing.join(timeout=60)
        # Anything a writer sealed under the old key just before the new primary was added and
        # committed after a pass had gone by is moved by another pass; then the old key is retired
        # while the readers go on.
        final = rewrap_all(storage, admin)
        retire(storage, admin, old)
        retired_at.append(reads[0])
        read_after_retire.wait(60)  # the readers go on decrypting after the retirement
    finally:
        stop_writing.set()
        stop.set()
        for t in [*readers, writing]:
            t.join(timeout=60)
    assert not errors, errors
    assert read_after_retire.is_set()
    assert report.ok and report2.ok and final.ok
    # Every template, including those written during the rotation, holds its last written content.
    _check_all(storage, service, expected)
    assert set(key_usage(storage)) == {admin.primary_key_id()}, (report, report2, final)
    assert old not in {k.key_id for k in admin.keys()}


class _RacingTemplates:
    """The real template repository, plus one enrolment that lands between a rotation's read
    and its compare-and-swap: what a live service does at the worst moment."""

    def __init__(self, real, race) -> None:
        self._real, self._race, self.raced = real, race, False

    def __getattr__(self, name):
        return getattr(self._real, name)

    def replace_envelope(self, *args, **kwargs):
        if not self.raced:
            self.raced = True
            self._race()
        return self._real.replace_envelope(*args, **kwargs)


class _StorageView:
    def __init__(self, storage, templates) -> None:
        self.templates, self.subjects, self.transaction = templates, storage.subjects, storage.transaction
        self.exclusive = storage.exclusive


def test_compare_and_swap_never_loses_a_concurrent_enrolment(storage, tmp_path):
    keyring = LocalKeyring(tmp_path / "keyring.json")
    crypto = EnvelopeCrypto(keyring)
    old = keyring.primary_key_id()
    expected = _seed(storage, crypto, 6)
    first_id = min(r.id for r in storage.templates.iter_for_rewrap("", 100))
    first = next(b for b in expected if isinstance(b, TemplateBinding) and storage.templates.get(
        b.tenant_id, b.subject_id, b.modality, b.model_id, b.channel).id == first_id)

    # The racing write is sealed under the OLD key (a service that sampled the primary just
    # before the switch), so only the envelope comparison can tell it from the rotation's copy.
    stale = EnvelopeCrypto(Pinned(keyring, old))
    fresh = os.urandom(64)

    def race():
        _put_env(storage, first, stale.encrypt_template(first, fresh))
        expected[first] = fresh

    racing = _RacingTemplates(storage.templates, race)
    keyring.add_key()
    report = rewrap_all(_StorageView(storage, racing), keyring, batch=100)  # type: ignore[arg-type]  # the parts it uses
    assert racing.raced and report.conflicts == 1 and report.ok
    _check_all(storage, crypto, expected)  # the racing enrolment survived...
    assert set(key_usage(storage)) == {keyring.primary_key_id()}  # ...and was re-wrapped next pass


def _put_env(storage, b, env) -> None:
    storage.templates.put(
        TemplateRecord(b.tenant_id, b.subject_id, b.modality, b.model_id, b.channel, env, envelope_key_id(env), 3),
        replace=True,
    )


def test_a_damaged_record_is_reported_not_skipped_silently(storage, tmp_path):
    keyring = LocalKeyring(tmp_path / "keyring.json")
    crypto = EnvelopeCrypto(keyring)
    expected = _seed(storage, crypto, 5)
    b = next(k for k in expected if isinstance(k, TemplateBinding))
    rec = storage.templates.get(b.tenant_id, b.subject_id, b.modality, b.model_id, b.channel)
    bad = bytearray(rec.envelope)
    bad[-1] ^= 1
    _put_env(storage, b, bytes(bad))
    report = rotate(storage, keyring, batch=2)
    assert not report.ok and list(report.failures) == [f"template {rec.id}"]
    assert "TamperedEnvelopeError" in report.failures[f"template {rec.id}"]
    assert report.templates_rewrapped == 4


def test_retire_counts_what_lies_outside_the_database_without_holding_its_write_lock(tmp_path):
    """A Redis replay store's count takes seconds at a bank's size; counted inside retire's transaction it
    held SQLite's single write lock all along, stalling every service's audited write. Data in the database
    is still counted inside the transaction (no enrolment commits between the count and the removal)."""
    import sqlite3
    from collections import Counter

    path = tmp_path / "biogate.sqlite"
    storage = open_storage(f"sqlite:///{path}")
    keyring = LocalKeyring(tmp_path / "keyring.json")
    old = keyring.primary_key_id()
    rotate(storage, keyring, cipher="AES-256-GCM", batch=4)

    def write_lock_free() -> bool:
        other = sqlite3.connect(path, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            other.close()

    seen = {}

    def outside():
        seen["outside"] = write_lock_free()
        return {"voice replay fingerprint": (Counter({old: 2}), "a while")}

    def inside():
        seen["inside"] = write_lock_free()
        return {}

    with pytest.raises(KeyInUseError, match="still seals 2 voice replay fingerprint"):
        retire(storage, keyring, old, kept_elsewhere=inside, kept_outside=outside)
    assert seen == {"outside": True}  # refused before the transaction began
    retire(storage, keyring, old, kept_elsewhere=inside, kept_outside=lambda: {})
    assert seen == {"outside": True, "inside": False}
    storage.close()
