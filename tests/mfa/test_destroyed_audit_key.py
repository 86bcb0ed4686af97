"""A service replica started before `biogate audit switch-key` and never restarted, through gRPC,
when `biogate audit destroy-key` destroys the key it still holds: its key check finds the trail's
signed `audit.key_destroyed` record, its readiness turns NOT_SERVING (the orchestrator routes around
it) and every audited call is refused UNAVAILABLE with nothing written, until it is restarted. A
replica on the new key serves on. Real SQLite and PostgreSQL, the CLI's own commands."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.api.v1 import mfa_pb2, mfa_pb2_grpc
from services.common.crypto.backend import open_audit_signer
from services.common.errors import details_of
from services.common.storage import open_storage
from tests.audit.test_audit_cli import _run
from tests.conftest import ServiceHarness, present
from tests.mfa.conftest import settings_for, setup_subject, subject

S = health_pb2.HealthCheckResponse
NAME = mfa_pb2.DESCRIPTOR.services_by_name["MfaService"].full_name


def refusals() -> float:
    return REGISTRY.get_sample_value("biogate_audit_destroyed_key_refusals_total") or 0.0


def test_a_replica_on_a_destroyed_audit_key_turns_not_serving_and_refuses_audited_calls(tmp_path, storage_dsn,
                                                                                        capsys):
    settings = settings_for(tmp_path, storage_dsn)
    settings.audit.key_check_s = 0.05
    stale, current = ServiceHarness(settings), ServiceHarness(settings)
    stale.start("mfa")
    storage = open_storage(settings.storage_dsn)
    try:
        old = open_audit_signer(settings, create=False).key_id
        with stale.channel("mfa") as channel:
            call = mfa_pb2_grpc.MfaServiceStub(channel)
            health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs declare none of its methods
            ref = setup_subject(call, subject(sid="cust-stale-1"), phone="+8613800000001")
            watch = health.Watch(health_pb2.HealthCheckRequest(service=NAME), timeout=120)
            assert next(watch).status == S.SERVING
            assert _run(settings, ["audit", "new-key"]) == 0
            assert _run(settings, ["audit", "switch-key"]) == 0
            call.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800000002"))  # retired
            assert present(storage.audit.head()).key_id == old

            assert _run(settings, ["audit", "destroy-key", old]) == 0
            destroyed = present(storage.audit.last()).seq
            assert next(watch).status == S.NOT_SERVING  # no call came in: the check found it
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == S.SERVING  # liveness

            records, phone, refused = storage.audit.last(), storage.subjects.get_phone(ref.tenant_id,
                                                                                      ref.subject_id), refusals()
            with pytest.raises(grpc.RpcError) as err:
                call.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800000009"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == (
                f"the audit key {old} this process signs with was destroyed at seq {destroyed} (biogate audit "
                "destroy-key); restart this process to load the current key")
            assert details_of(err.value)["reason"] == "AUDIT_KEY_DESTROYED"
            assert refusals() == refused + 1
            # nothing written: neither the number nor a record
            assert storage.audit.last() == records
            assert storage.subjects.get_phone(ref.tenant_id, ref.subject_id) == phone
            watch.cancel()

        server = current.start("mfa")  # a replica started after the switch: the new key
        (check,) = server.definition.readiness
        assert check.check() is None
        with current.channel("mfa") as channel:
            mfa_pb2_grpc.MfaServiceStub(channel).SetPhoneNumber(
                mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800000009"))
        assert present(storage.audit.last()).seq == present(records).seq + 1 and present(storage.audit.head()).key_id != old
        capsys.readouterr()
        assert _run(settings, ["audit", "verify"]) == 0, capsys.readouterr().out  # nothing signed by old after seq
    finally:
        storage.close()
        stale.stop()
        current.stop()
