"""`biogate keys ...` handlers, called as services/cli.py calls them."""

import argparse
import json

import pytest

from services.common.audit import AuditSigner, verify
from services.common.crypto import EnvelopeCrypto, LocalKeyring, TemplateBinding, envelope_key_id, open_keyring
from services.commands import keys as keys_cli
from services.common.storage import TemplateRecord, open_storage
from tests.conftest import present


def _parse(argv):
    parser = argparse.ArgumentParser(prog="biogate")
    keys_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _run(settings, argv) -> int:
    args = _parse(argv)
    return args.func(settings, args)


def test_keys_commands_end_to_end(settings, capsys):
    assert _run(settings, ["keys", "init"]) == 0
    assert "created" in capsys.readouterr().out
    assert _run(settings, ["keys", "init"]) == 0
    assert "exists" in capsys.readouterr().out

    keyring = open_keyring(settings)
    first = keyring.primary_key_id()
    crypto = EnvelopeCrypto(keyring)
    b = TemplateBinding("bank-a", "cust-1", "face", "arcface-r100")
    env = crypto.encrypt_template(b, b"template")
    storage = open_storage(settings.storage_dsn)
    storage.templates.put(TemplateRecord("bank-a", "cust-1", "face", "arcface-r100", "", env, envelope_key_id(env), 1))
    storage.subjects.set_phone("bank-a", "cust-1", crypto.encrypt_contact("bank-a", "cust-1", "+8613800138000"), first)

    assert _run(settings, ["keys", "list"]) == 0
    out = capsys.readouterr().out
    assert first in out and "yes" in out and out.rstrip().endswith("2")

    assert _run(settings, ["keys", "retire", first]) == 1
    assert "still wraps 2 record(s)" in capsys.readouterr().err

    assert _run(settings, ["keys", "rotate", "--cipher", "SM4-GCM", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    new = open_keyring(settings).primary_key_id()  # the CLI rotated in its own keyring instance
    assert new != first and f"new primary key {new}" in out and "1 templates and 1 phone numbers" in out

    assert _run(settings, ["keys", "retire", first]) == 0
    assert f"retired key {first}" in capsys.readouterr().out
    rec = present(storage.templates.get("bank-a", "cust-1", "face", "arcface-r100"))
    assert crypto.decrypt_template(b, rec.envelope) == b"template"

    # Key operations are in the audit trail, and the trail verifies.
    events = [(r.event_type, json.loads(r.details).get("key")) for r in storage.audit.iter_records()]
    assert events == [("keys.added", "audit-signing"),  # `keys init` on a new deployment makes every key
                      ("keys.adding", "kek"), ("keys.adding", "pseudonym"), ("keys.added", "kek"),
                      ("keys.added", "pseudonym"),
                      ("keys.adding", "kek"), ("keys.added", "kek"), ("keys.rotate", None), ("keys.retire", None)]
    assert verify(storage.audit, AuditSigner.load(settings.audit_signing_key_file).public_key).ok
    storage.close()


def test_list_flags_records_under_a_key_the_keyring_lost(settings, capsys, tmp_path):
    storage = open_storage(settings.storage_dsn)
    foreign = EnvelopeCrypto(LocalKeyring(tmp_path / "elsewhere.json"))
    env = foreign.encrypt_template(TemplateBinding("bank-a", "c", "face", "m"), b"x")
    storage.templates.put(TemplateRecord("bank-a", "c", "face", "m", "", env, envelope_key_id(env), 1))
    storage.close()
    assert _run(settings, ["keys", "init"]) == 0
    assert _run(settings, ["keys", "list"]) == 1
    assert "MISSING" in capsys.readouterr().out


def test_retire_unknown_key(settings, capsys):
    _run(settings, ["keys", "init"])
    assert _run(settings, ["keys", "retire", "k-nope"]) == 1
    assert "not in the keyring" in capsys.readouterr().err


def test_subcommand_is_required():
    with pytest.raises(SystemExit):
        _parse(["keys"])


@pytest.fixture(params=["database", "redis"])
def replay_settings(request, tmp_path):
    """Settings whose voice replay store is the database or the local Redis, under a key prefix of
    this test's own (every key under it deleted afterwards)."""
    import uuid

    import redis

    from tests.conftest import make_settings, require_redis

    if request.param == "database":
        yield make_settings(tmp_path / "data")
        return
    url = require_redis("redis://127.0.0.1:6379/0")
    prefix = f"biogate-test:keys:{uuid.uuid4().hex[:10]}"
    yield make_settings(tmp_path / "data", voice={"replay_store": url, "replay_key_prefix": prefix})
    client = redis.Redis.from_url(url)
    stale = list(client.scan_iter(f"{prefix}:*"))
    if stale:
        client.delete(*stale)


def test_rotation_rewraps_voice_replay_fingerprints_and_retire_waits_for_any_left(replay_settings, capsys):
    """The replay cache seals each accepted capture's fingerprint under the primary of the day and keeps
    it voice.replay_retention_s. Rotation re-wrapped templates and phone numbers only, and retire
    counted only those (then the database store only, not Redis): retiring the old key made every
    voice verification of a subject with a retained capture fail (the replay check raised
    UnknownKeyError: INTERNAL for the customer) until the capture expired."""
    import numpy as np

    from services.voice.replay import DatabaseReplayStore, Fingerprint, RedisReplayStore, ReplayCache, open_store
    from tests.crypto.conftest import Pinned

    settings = replay_settings
    voice = settings.voice
    assert _run(settings, ["keys", "init"]) == 0
    keyring = open_keyring(settings)
    first = keyring.primary_key_id()
    storage = open_storage(settings.storage_dsn)
    store = open_store(voice.replay_store, voice.replay_retention_s, voice.replay_max_per_subject,
                       voice.replay_key_prefix, storage=storage)
    assert isinstance(store, (RedisReplayStore, DatabaseReplayStore))

    def cache(crypto):
        return ReplayCache(store, crypto.seal, crypto.open, lambda tenant, subject: f"ps_{subject}")

    fp = Fingerprint(np.random.default_rng(0).integers(-60, 60, (32, 200)).astype(np.int8))
    for subject in ("cust-1", "cust-1", "cust-3"):
        cache(EnvelopeCrypto(keyring)).remember("bank-a", subject, fp)
    capsys.readouterr()
    assert _run(settings, ["keys", "rotate", "--batch", "1"]) == 0
    assert "0 templates, 0 phone numbers and 3 voice replay fingerprint(s)" in capsys.readouterr().out
    new = open_keyring(settings).primary_key_id()
    assert store.key_usage() == {new: 3}

    # A capture accepted just before the rotation added the new primary, stored after its last pass.
    cache(EnvelopeCrypto(Pinned(keyring, first))).remember("bank-a", "cust-2", fp)
    capsys.readouterr()
    assert _run(settings, ["keys", "list"]) == 0  # the records retire waits for are the ones listed
    listed = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed == {first: "1", new: "3"}
    assert _run(settings, ["keys", "retire", first]) == 1
    err = capsys.readouterr().err
    assert f"key {first!r} still seals 1 voice replay fingerprint(s)" in err and "voice.replay_retention_s" in err
    assert _run(settings, ["keys", "rewrap"]) == 0
    assert _run(settings, ["keys", "retire", first]) == 0
    for subject in ("cust-1", "cust-2", "cust-3"):  # the voice service still reads every one
        assert cache(EnvelopeCrypto(open_keyring(settings))).best_match("bank-a", subject, fp) > 0.99
    assert len(store.recent("bank-a", "ps_cust-1")) == 2  # none lost, none duplicated
    if voice.replay_store != "database":
        assert isinstance(store, RedisReplayStore)
        ttl = store.client.ttl(store.key("bank-a", "ps_cust-1"))
        assert 0 < ttl <= voice.replay_retention_s + 1  # the re-wrap kept the expiry
    storage.close()


def test_memory_replay_store_a_fingerprint_under_a_retired_key_is_dropped_as_expired(tmp_path, caplog):
    """`keys retire` cannot see a voice process's memory (voice.replay_store: memory, development
    only): a fingerprint sealed under the retired key made every voice verification of its subject
    fail with INTERNAL (UnknownKeyError from the replay check) for voice.replay_retention_s. It is
    now left out of the check as if expired, counted in a metric and logged without the subject;
    any other envelope that does not open still fails loudly (tampering is not an expiry)."""
    import numpy as np
    from prometheus_client import REGISTRY

    from services.common.crypto.errors import TamperedEnvelopeError
    from services.voice.replay import Fingerprint, MemoryReplayStore, ReplayBinding, ReplayCache

    keyring = LocalKeyring(tmp_path / "keyring.json")
    first = keyring.primary_key_id()
    store = MemoryReplayStore(3600, 20)
    crypto = EnvelopeCrypto(keyring)
    cache = ReplayCache(store, crypto.seal, crypto.open, lambda tenant, subject: f"ps_{subject}")
    fp = Fingerprint(np.random.default_rng(0).integers(-60, 60, (32, 200)).astype(np.int8))
    cache.remember("bank-a", "cust-1", fp)
    keyring.add_key()
    cache.remember("bank-a", "cust-1", fp)  # one under each key
    keyring.remove_key(first)

    def dropped() -> float:
        return REGISTRY.get_sample_value("biogate_voice_replay_records_unreadable_total",
                                         {"reason": "key_retired"}) or 0.0

    before = dropped()
    assert cache.best_match("bank-a", "cust-1", fp) > 0.99  # the one under the new key still counts
    assert dropped() == before + 1
    assert "cust-1" not in caplog.text and "ps_cust-1" not in caplog.text
    assert "retired" in caplog.text

    store.add("bank-a", "ps_cust-9", crypto.seal(ReplayBinding("bank-a", "cust-9"), fp.to_bytes())[:-1] + b"\0")
    with pytest.raises(TamperedEnvelopeError):
        cache.best_match("bank-a", "cust-9", fp)


@pytest.mark.parametrize("replay_settings", ["redis"], indirect=True)
def test_a_redis_rewrap_never_brings_back_what_the_voice_service_trimmed_or_erased(replay_settings):
    """Each member is swapped by compare-and-swap in one script: a member the cap trimmed, or a
    subject erased, after the rotation read it stays gone (no set re-created without its expiry)."""
    import numpy as np

    from services.voice.replay import Fingerprint, RedisReplayStore, ReplayCache, open_store

    voice = replay_settings.voice
    keyring = LocalKeyring(replay_settings.keyring_file)
    store = open_store(voice.replay_store, voice.replay_retention_s, 2, voice.replay_key_prefix)
    assert isinstance(store, RedisReplayStore)
    crypto = EnvelopeCrypto(keyring)
    cache = ReplayCache(store, crypto.seal, crypto.open, lambda tenant, subject: f"ps_{subject}")
    fp = Fingerprint(np.random.default_rng(0).integers(-60, 60, (32, 200)).astype(np.int8))
    for subject in ("cust-1", "cust-1", "cust-2"):
        cache.remember("bank-a", subject, fp)
    table = store.sealed_table()
    target = keyring.add_key().key_id
    recs, page = [], table.fetch(target, 100, None)
    while page:  # SCAN pages: on a Redis holding other keys the three may come in several
        recs += page
        page = table.fetch(target, 100, table.cursor(page[-1]))
    assert len(recs) == 3
    mine = [r for r in recs if r.key == store.key("bank-a", "ps_cust-1").encode()]
    oldest = min(mine, key=lambda r: present(store.client.zscore(r.key, r.member)))

    cache.remember("bank-a", "cust-1", fp)  # the cap (2) trims the oldest
    assert table.swap(oldest, crypto.rewrap(oldest.envelope, target)) is False
    assert store.client.zcard(oldest.key) == 2

    [other] = [r for r in recs if r.key == store.key("bank-a", "ps_cust-2").encode()]
    cache.erase("bank-a", "cust-2")
    assert table.swap(other, crypto.rewrap(other.envelope, target)) is False
    assert not store.client.exists(other.key)

    [kept] = [r for r in mine if r is not oldest]
    assert table.swap(kept, crypto.rewrap(kept.envelope, target)) is True
    assert store.client.ttl(kept.key) > 0 and store.client.zcard(kept.key) == 2
    assert store.key_usage()[target] == 2  # the swapped one and the newest, sealed under the new primary


def test_an_unreachable_redis_replay_store_refuses_key_operations_naming_the_setting(tmp_path, capsys):
    """Its fingerprints can be neither re-wrapped nor counted: rotate and retire change nothing."""
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "data", voice={"replay_store": "redis://127.0.0.1:1/0"})
    assert _run(settings, ["keys", "init"]) == 0
    first = open_keyring(settings).primary_key_id()
    capsys.readouterr()
    for argv in (["rotate"], ["rewrap"], ["retire", first]):
        assert _run(settings, ["keys", *argv]) == 1
        err = capsys.readouterr().err
        assert "voice.replay_store redis://127.0.0.1:1/0: Redis cannot be reached" in err
        assert "nothing was changed" in err
    assert [k.key_id for k in open_keyring(settings).keys()] == [first]


def test_redis_key_usage_reads_only_each_fingerprints_header_and_counts_a_malformed_one_under_no_key(tmp_path):
    """`keys retire` counts the Redis fingerprints per key inside its database transaction: each
    ~20 KB member was fetched whole to read the key id in its first ~100 bytes (100,000 retained
    fingerprints: ~2 GB through Redis; bench/replay_key_usage.py). A member that is no envelope,
    or whose header promises more than it holds, still counts under "" (`keys rewrap` reports it)."""
    import uuid

    from services.voice.replay import ReplayBinding, RedisReplayStore
    from tests.conftest import require_redis

    url = require_redis("redis://127.0.0.1:6379/0")
    store = RedisReplayStore(url, 3600, 20, prefix=f"biogate-test:usage:{uuid.uuid4().hex[:10]}")
    try:
        keyring = LocalKeyring(tmp_path / "keyring.json")
        crypto = EnvelopeCrypto(keyring)
        first = keyring.primary_key_id()
        sealed = [crypto.seal(ReplayBinding("bank-a", f"cust-{i}"), bytes(20_000)) for i in range(40)]
        for i, envelope in enumerate(sealed):
            store.add("bank-a", f"ps_{i % 7}", envelope)
        store.add("bank-a", "ps_bad", b"not an envelope")
        store.add("bank-a", "ps_bad", sealed[0][: len(sealed[0]) - 20_001])  # its payload one byte short of none
        store.add("bank-a", "ps_bad", sealed[0][:60])  # cut inside the header
        store.add("bank-a", "ps_bad", b"")

        def sent() -> int:
            return int(store.client.info("stats")["total_net_output_bytes"])

        before = sent()
        usage = store.key_usage(batch=3)
        moved = sent() - before
        assert usage == {first: 40, "": 4}
        assert moved < 200_000, moved  # the members are 800 KB together; their headers ~5 KB
    finally:
        stale = list(store.client.scan_iter(f"{store.prefix}:*"))
        if stale:
            store.client.delete(*stale)
