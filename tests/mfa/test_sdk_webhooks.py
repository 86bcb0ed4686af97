"""The client SDK's webhook check (``biogate_client.webhooks``) and its example receiver
(clients/python/examples/webhook_receiver.py) against events the real MFA outbox delivers over
loopback HTTP (SQLite and PostgreSQL), signed under two secrets while one rotates."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from biogate_client import webhooks as sdk_webhooks
from tests.conftest import present
from tests.mfa.test_reviews import NEW, OLD, TENANT, Receiver, review_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "python" / "examples" / "webhook_receiver.py"


@contextmanager
def outbox_to(tmp_path, storage_dsn, clock, url: str, secrets: list[str]) -> Iterator:
    """An MFA orchestrator whose webhooks, signed under ``secrets``, go to ``url``."""
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    settings = review_settings(tmp_path, storage_dsn, url, secret=None, secrets=secrets)
    prepare(settings)
    rt = Runtime.open(settings)
    o = Orchestrator(rt, clock=clock)
    try:
        yield o
    finally:
        o.close()
        rt.close()


def test_the_sdk_accepts_what_the_mfa_outbox_signs_and_refuses_it_altered_or_stale(tmp_path, storage_dsn, clock):
    receiver = Receiver(clock, secret=OLD, verify=sdk_webhooks.verify)
    try:
        with outbox_to(tmp_path, storage_dsn, clock, receiver.url, [NEW, OLD]) as o:
            rec = present(o.outbox.enqueue(TENANT, "review.opened", {"review_id": "rev_1"}, clock()))
            assert o.outbox.deliver_due() == 1
    finally:
        receiver.close()
    [got] = receiver.requests
    assert got["verified"] is True and got["event_id"] == rec.id == got["event"]["id"]
    body, header, now = got["raw"], got["signature"], clock().timestamp()
    sdk_webhooks.verify(NEW, header, body, now)  # a receiver that already moved to the new secret
    with pytest.raises(ValueError, match="does not match"):
        sdk_webhooks.verify([NEW, OLD], header, body.replace(b"rev_1", b"rev_2"), now)
    with pytest.raises(ValueError, match="outside the tolerance"):
        sdk_webhooks.verify([NEW, OLD], header, body, now + sdk_webhooks.TOLERANCE_S + 1)
    with pytest.raises(ValueError, match="does not match"):
        sdk_webhooks.verify("whsec-another-0123456789", header, body, now)
    # a header padded with signatures is refused before any is computed, the good one among them or not
    padded = ",".join([header, *[f"v1={'0' * 64}"] * (sdk_webhooks.MAX_SIGNATURES - 1)])
    with pytest.raises(ValueError, match=f"{sdk_webhooks.MAX_SIGNATURES + 1} v1 signatures"):
        sdk_webhooks.verify([NEW, OLD], padded, body, now)
    sdk_webhooks.verify(NEW, ",".join(padded.split(",")[:-1]), body, now)  # as many as allowed: checked


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", **headers}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def test_the_example_receiver_acts_once_per_event_and_refuses_forgeries(tmp_path, storage_dsn, clock):
    acted: list[dict] = []
    server = load_example().receiver([OLD], str(tmp_path / "bank-events.sqlite"), acted.append)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hooks/biogate"
    try:
        with outbox_to(tmp_path, storage_dsn, clock, url, [NEW, OLD]) as o:
            rec = present(o.outbox.enqueue(TENANT, "review.opened", {"review_id": "rev_1"}, clock()))
            assert o.outbox.deliver_due() == 1
            # the receiver's answer was lost (the MFA stopped before recording it): sent again
            assert o.store.webhooks.settle(rec.id, 1, None, clock(), "")
            assert o.outbox.deliver_due() == 1
        assert [e["id"] for e in acted] == [rec.id]

        body = json.dumps({"id": "evt_forged", "type": "review.closed", "data": {"review_id": "rev_1"}}).encode()
        signed = {sdk_webhooks.EVENT_HEADER: "evt_forged",
                  sdk_webhooks.SIGNATURE_HEADER: sdk_webhooks.signature(OLD, body, int(time.time()))}
        stale = {**signed, sdk_webhooks.SIGNATURE_HEADER: sdk_webhooks.signature(OLD, body, int(time.time()) - 3600)}
        assert post(url, body.replace(b"rev_1", b"rev_9"), signed) == (400, "the signature does not match the body")
        assert post(url, body, stale) == (400, "the signature's timestamp is outside the tolerance")
        assert post(url, body, {}) == (400, "malformed BioGate-Signature header")
        assert [e["id"] for e in acted] == [rec.id]
        assert post(url, body, signed) == (200, "")  # signed with a secret it knows: taken
        assert [e["id"] for e in acted] == [rec.id, "evt_forged"]
    finally:
        server.shutdown()
        server.server_close()
