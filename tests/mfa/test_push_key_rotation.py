"""Push confirmations sealed in MFA sessions across `biogate keys rotate|rewrap|retire`, with a real
MFA server on loopback (SQLite and PostgreSQL): the fields a pending confirmation shows are sealed
under the primary of the moment and kept in the session's state until they are answered; rotation
re-wraps them by compare-and-swap on the session row, and retire refuses while any stored session
(an expired one too, kept until `biogate purge`) still holds some under the key."""

from __future__ import annotations

import argparse
import base64
import threading

import pytest

from services.commands import keys as keys_cli
from services.common.crypto import EnvelopeCrypto, envelope_key_id, open_keyring
from services.common.crypto.rotation import rewrap_all
from services.mfa.push.confirmation import SealedFields
from tests.crypto.conftest import Pinned
from tests.mfa.pushapp import PAYEE, F, PushApp, browser, customer, push_server, shown_fields, start


@pytest.fixture(params=["sqlite", "postgres"])
def env(request, tmp_path):
    with push_server(tmp_path, request.param) as running:
        yield running


def keys(settings, *argv) -> int:
    parser = argparse.ArgumentParser(prog="biogate")
    keys_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", *argv])
    return args.func(settings, args)


def pending(stub, settings, sid):
    """A subject with a bound app, and a web payment whose push confirmation is out, unanswered."""
    app = PushApp(f"inst-{sid}")
    ref = customer(stub, settings, sid, app)
    s = start(stub, app, ref, action="payment", amount=120000, channel=F.CHANNEL_WEB, device=browser(),
              country="FR")
    sent = stub.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=s.session_id, payee=PAYEE))
    assert sent.sent
    return app, s, sent


def sealed_of(orch, session_id) -> bytes:
    return base64.b64decode(orch.store.auth_sessions.get(session_id).state["push"]["sealed"])


def test_a_pending_confirmation_survives_rotate_and_retire_of_the_old_key(env, capsys):
    """Rotation re-wrapped templates, phones and voice replay fingerprints only, and retire counted only
    those: once the old key was retired, the app's fetch of a confirmation still out failed (the key
    gone), and the customer could not confirm the payment."""
    harness, stub, orch = env
    settings = harness.settings
    app, s, sent = pending(stub, settings, "cust-rotate")
    first = open_keyring(settings).primary_key_id()
    assert envelope_key_id(sealed_of(orch, s.session_id)) == first

    assert keys(settings, "rotate") == 0
    assert "1 push confirmation(s)" in capsys.readouterr().out
    new = open_keyring(settings).primary_key_id()
    assert envelope_key_id(sealed_of(orch, s.session_id)) == new
    assert keys(settings, "retire", first) == 0, capsys.readouterr().err

    crypto = EnvelopeCrypto(open_keyring(settings))  # what any process holds now: the old key is gone
    assert b"Li Lei" in crypto.open(SealedFields("push-bank", "cust-rotate", sent.confirmation_id),
                                    sealed_of(orch, s.session_id))
    fields = shown_fields(stub, settings, app, sent.confirmation_id)  # the running MFA's read
    assert fields["payee"] == {"name": "Li Lei", "account": "6222 **** **** 1234"}
    r = stub.ConfirmTransaction(F.ConfirmTransactionRequest(session_id=s.session_id,
                                                            answer=app.answer(fields, sent.number)))
    assert r.result.passed


@pytest.mark.parametrize("expired", [False, True], ids=["live", "expired"])
def test_retire_refuses_while_a_session_holds_fields_sealed_under_the_key(env, capsys, expired):
    """A confirmation sealed just before the rotation added the new primary and stored after its last
    pass stays under the old key: retire counts it and refuses with nothing changed, `keys rewrap`
    moves it. An expired session's too (it was neither counted nor moved: its row, kept until
    `biogate purge`, was left under a retired key)."""
    harness, stub, orch = env
    settings = harness.settings
    app, s, sent = pending(stub, settings, "cust-late")
    keyring = open_keyring(settings)
    first = keyring.primary_key_id()
    assert keys(settings, "rotate") == 0
    capsys.readouterr()

    late = EnvelopeCrypto(Pinned(keyring, first)).seal(SealedFields("push-bank", "cust-late", sent.confirmation_id),
                                                       b'{"late": true}')

    def store_late(st):
        st.push["sealed"] = base64.b64encode(late).decode()
    orch.sessions.mutate(orch.sessions.get(s.session_id), store_late)
    if expired:
        expire(orch, s.session_id)

    assert keys(settings, "retire", first) == 1
    err = capsys.readouterr().err
    assert f"key {first!r} still seals 1 push confirmation(s)" in err and "biogate purge" in err
    assert first in [k.key_id for k in open_keyring(settings).keys()]
    assert keys(settings, "rewrap") == 0
    assert "1 push confirmation(s)" in capsys.readouterr().out
    assert keys(settings, "retire", first) == 0
    assert EnvelopeCrypto(open_keyring(settings)).open(
        SealedFields("push-bank", "cust-late", sent.confirmation_id), sealed_of(orch, s.session_id)) == b'{"late": true}'


def test_the_rewrap_loses_to_the_mfa_writing_the_same_session_and_never_undoes_its_write(env):
    """The swap is a compare-and-swap on the session row's version: a session the MFA changed after
    the rotation read it is not overwritten (the MFA's change stays), and the next pass re-wraps it;
    the MFA's own compare-and-swap retries over a re-wrap and loses nothing either."""
    from services.mfa.push.sealed import SealedConfirmations

    harness, stub, orch = env
    settings = harness.settings
    _, s, _ = pending(stub, settings, "cust-race")
    keyring = open_keyring(settings)
    first = keyring.primary_key_id()
    confirmations = SealedConfirmations(orch.store)
    table = confirmations.sealed_table()
    second = keyring.add_key()

    [rec] = [r for r in table.fetch(second.key_id, 10, None) if r.session.id == s.session_id]
    new_envelope = EnvelopeCrypto(keyring).rewrap(rec.envelope, second.key_id)

    def bump(st):
        st.push_sends += 1
    orch.sessions.mutate(orch.sessions.get(s.session_id), bump)  # the MFA writes after the read
    with orch.rt.storage.transaction():
        assert table.swap(rec, new_envelope) is False
    after = orch.sessions.get(s.session_id)
    assert after.state.push_sends == 2 and envelope_key_id(sealed_of(orch, s.session_id)) == first

    # Both at once, many times: every one of the MFA's writes is kept, and the rewrap ends with the
    # session's fields under the target.
    writes: list = []
    stop = threading.Event()

    def mfa():
        while not stop.is_set() or len(writes) < 20:
            orch.sessions.mutate(orch.sessions.get(s.session_id), bump)
            writes.append(1)
    t = threading.Thread(target=mfa)
    t.start()
    try:
        report = rewrap_all(orch.rt.storage, keyring, second.key_id, batch=1, tables=[table])
    finally:
        stop.set()
        t.join()
    assert report.ok
    # A pass that lost every swap ends the rewrap (it made no progress); run as `keys rewrap` would be.
    assert rewrap_all(orch.rt.storage, keyring, second.key_id, batch=1, tables=[table]).ok
    final = orch.sessions.get(s.session_id)
    assert final.state.push_sends == 2 + len(writes)
    assert envelope_key_id(sealed_of(orch, s.session_id)) == second.key_id
    assert confirmations.key_usage().get(second.key_id, 0) >= 1 and first not in confirmations.key_usage()


def expire(orch, session_id) -> None:
    """The session's lifetime over (its row kept until `biogate purge`, retention.sessions_s later)."""
    from datetime import timedelta

    from services.common.storage.db import utcnow

    rec = orch.store.auth_sessions.get(session_id)
    orch.store.auth_sessions.update(session_id, rec.version, dict(rec.state), utcnow() - timedelta(seconds=1))


def test_rotate_and_retire_leave_no_expired_session_with_fields_the_keyring_cannot_open(env, capsys):
    """Rotation re-wrapped the sealed fields of live sessions only and retire counted only those: an
    unanswered confirmation whose session had expired (kept for retention.sessions_s until `biogate
    purge`) kept its fields under the old key, and retire removed that key claiming success, leaving
    rows in the database that no key in the keyring opens."""
    harness, stub, orch = env
    settings = harness.settings
    _, s, sent = pending(stub, settings, "cust-expired")
    expire(orch, s.session_id)
    first = open_keyring(settings).primary_key_id()

    assert keys(settings, "rotate") == 0
    assert "1 push confirmation(s)" in capsys.readouterr().out
    assert keys(settings, "retire", first) == 0, capsys.readouterr().err
    crypto = EnvelopeCrypto(open_keyring(settings))
    assert b"Li Lei" in crypto.open(SealedFields("push-bank", "cust-expired", sent.confirmation_id),
                                    sealed_of(orch, s.session_id))

