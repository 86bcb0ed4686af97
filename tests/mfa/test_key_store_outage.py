"""The MFA service with its keys in a real SoftHSM2 token, through gRPC, while the HSM restarts and
while it is away: a restart costs one reconnect and no error; an absent token answers UNAVAILABLE
naming it, writes nothing, and serves again when it is back, without a restart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.api.v1 import mfa_pb2, mfa_pb2_grpc
from services.common.errors import details_of
from services.common.runtime import Runtime
from services.common.storage import SqlStorage
from tests.conftest import ServiceHarness, present
from tests.mfa.conftest import settings_for, setup_subject, subject
from tests.softhsm import PIN, TOKEN_LABEL, hsm_away, restart_hsm


def reconnects(outcome: str) -> float:
    return REGISTRY.get_sample_value("biogate_pkcs11_reconnects_total", {"outcome": outcome}) or 0.0


def audit_count(rt: Runtime) -> int:
    assert isinstance(rt.storage, SqlStorage)
    with rt.storage.db.read() as q:
        return q.one("SELECT COUNT(*) FROM audit_records")[0]


@contextmanager
def mfa_on_the_token(softhsm, tmp_path) -> Iterator[tuple[mfa_pb2_grpc.MfaServiceStub, Runtime]]:
    """The MFA serving with its keys in the token, and a runtime of the test's own on its storage."""
    keys = softhsm.keys_config()
    keys["pkcs11"]["reconnect_interval_s"] = 0
    settings = settings_for(tmp_path, keys=keys)
    harness = ServiceHarness(settings)
    harness.start("mfa")
    rt = Runtime.open(settings)
    try:
        with harness.channel("mfa") as channel:
            yield mfa_pb2_grpc.MfaServiceStub(channel), rt
    finally:
        rt.close()
        harness.stop()


def test_the_mfa_survives_an_hsm_restart_and_outage(softhsm, tmp_path):
    with mfa_on_the_token(softhsm, tmp_path) as (call, rt):
        ref = setup_subject(call, subject(sid="cust-hsm-1"), phone="+8613800000001")

        ok = reconnects("ok")
        restart_hsm(softhsm)  # the seal and the audit record's signature both need the token
        setup_subject(call, subject(sid="cust-hsm-2"), phone="+8613800000002")
        assert reconnects("ok") == ok + 1

        records = audit_count(rt)
        with hsm_away(softhsm):
            with pytest.raises(grpc.RpcError) as err:
                call.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800000009"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        message = err.value.details() or ""
        assert f"the PKCS#11 token {TOKEN_LABEL!r} is unreachable" in message and PIN not in message
        info = details_of(err.value)
        assert info["reason"] == "KEY_STORE_UNAVAILABLE" and info["retry_delay_s"] >= 1
        assert audit_count(rt) == records  # nothing written: no number, no audit record

        # back: served again by the same process
        call.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800000009"))
        envelope, _ = present(rt.storage.subjects.get_phone(ref.tenant_id, ref.subject_id))
        assert rt.crypto.decrypt_contact(ref.tenant_id, ref.subject_id, envelope) == "+8613800000009"
        assert audit_count(rt) == records + 1


def test_readiness_is_not_serving_only_while_the_token_cannot_be_reconnected(softhsm, tmp_path):
    keys = softhsm.keys_config()
    keys["pkcs11"].update(reconnect_interval_s=0, health_check_s=0.05)
    harness = ServiceHarness(settings_for(tmp_path, keys=keys))
    harness.start("mfa")
    S = health_pb2.HealthCheckResponse
    try:
        with harness.channel("mfa") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs declare none of its methods
            name = mfa_pb2.DESCRIPTOR.services_by_name["MfaService"].full_name
            watch = health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=120)
            assert next(watch).status == S.SERVING
            with hsm_away(softhsm):
                assert next(watch).status == S.NOT_SERVING  # no call came in: the check found it
                # liveness: a restart would not bring the HSM back
                assert health.Check(health_pb2.HealthCheckRequest(service="")).status == S.SERVING
            assert next(watch).status == S.SERVING  # reconnected by the check, no restart
            watch.cancel()
    finally:
        harness.stop()


def test_a_key_that_fails_while_the_token_answers_is_failed_precondition_not_unavailable(softhsm, tmp_path):
    """Before, a key-encryption key whose stored value the token can no longer read (every operation
    with it fails, the token answering) failed the call with an unhandled error (INTERNAL, 'quote
    request id') when sealing, and UNAVAILABLE KEY_STORE_UNAVAILABLE with a retry hint when opening:
    clients retried what never works. Now FAILED_PRECONDITION, reason KEY_STORE_KEY_INVALID, no retry
    hint, naming the key (never its material), with nothing written; the token unreachable stays
    UNAVAILABLE (above)."""
    from services.common.crypto import open_keyring
    from services.common.crypto.hsm import Pkcs11Keyring
    from tests.softhsm import corrupt_key_value, objects

    with mfa_on_the_token(softhsm, tmp_path) as (call, rt):
        ref = setup_subject(call, subject(sid="cust-kek-1"), phone="+8613800000001")
        before = objects(softhsm)
        keyring = open_keyring(rt.settings)
        assert isinstance(keyring, Pkcs11Keyring)
        kid = keyring.add_key().key_id  # the primary: the next number is sealed under it
        (kek,) = objects(softhsm) - before
        corrupt_key_value(kek)
        try:
            records = audit_count(rt)
            failures = REGISTRY.get_sample_value("biogate_pkcs11_key_failures_total", {"key": "kek"}) or 0.0
            with pytest.raises(grpc.RpcError) as err:
                call.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800000009"))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            message = err.value.details() or ""
            assert f"the key-encryption key {kid!r}" in message and "retrying does not help" in message
            assert PIN not in message and "+86138" not in message
            info = details_of(err.value)
            assert info["reason"] == "KEY_STORE_KEY_INVALID" and info["retry_delay_s"] is None
            assert REGISTRY.get_sample_value("biogate_pkcs11_key_failures_total", {"key": "kek"}) == failures + 1
            assert audit_count(rt) == records  # nothing written: no number, no audit record
            envelope, _ = present(rt.storage.subjects.get_phone(ref.tenant_id, ref.subject_id))
            assert rt.crypto.decrypt_contact(ref.tenant_id, ref.subject_id, envelope) == "+8613800000001"
        finally:
            with keyring.token.using():
                keyring._kek(kid).destroy()
