"""An enrol-and-verify-shaped flow through the real services with a known phone number, ID number
and embedding: consent, contact, an encrypted template, erasure. None of the three may appear in
the logs, the audit table or (for the phone and embedding) the database file in clear."""

from __future__ import annotations

import json
import logging
import sqlite3

import grpc
import numpy as np
import pytest

from services.common.api.v1 import common_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc
from services.common.audit import AuditSigner, verify
from services.common.crypto import TemplateBinding, envelope_key_id
from services.common.errors import details_of
from services.common.runtime import Runtime
from services.common.storage import TemplateRecord
from tests.conftest import make_settings, present

PHONE = "+8613812345678"
PHONE_LOCAL = "13812345678"
ID_NUMBER = "11010519491231002X"
EMBEDDING = np.random.default_rng(7).standard_normal(128).astype(np.float32)
EMBEDDING /= np.linalg.norm(EMBEDDING)


def secrets_in(text: str) -> list[str]:
    found = [s for s in (PHONE, PHONE_LOCAL, ID_NUMBER) if s in text]
    found += [f"embedding value {v}" for v in (repr(float(EMBEDDING[0])), f"{EMBEDDING[0]:.6f}") if v in text]
    return found


def test_personal_data_never_reaches_logs_audit_or_database(services, captured_logs):
    face = services.start("face")
    voice = services.start("voice")
    # The MFA erases templates through the face and voice services' own DeleteSubject.
    services.settings = make_settings(services.settings.data_dir, clients={
        "face": {"target": face.address}, "voice": {"target": voice.address}})
    services.start("mfa")
    subject = common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-0042")
    with services.channel("mfa", "dev-all") as channel:
        stub = mfa_pb2_grpc.MfaServiceStub(channel)
        stub.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
            subject=subject, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
            modalities=[common_pb2.MODALITY_FACE], granted=True, policy_version="privacy-2026-01")))
        masked = stub.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=subject, phone_e164=PHONE)).masked_phone
        assert masked.endswith("5678") and PHONE_LOCAL not in masked

        # Hostile callers send personal numbers where ids belong; the refusal must not echo them.
        for bad in (ID_NUMBER, PHONE_LOCAL):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetConsent(common_pb2.GetConsentRequest(subject=common_pb2.SubjectRef(tenant_id="bank-a", subject_id=bad)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert details_of(err.value)["reason"] == "PERSONAL_NUMBER_AS_ID"
            assert bad not in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
                subject=subject, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
                modalities=[common_pb2.MODALITY_FACE], granted=True, policy_version="v1", evidence_ref=ID_NUMBER)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # The enrolment a face service makes: the embedding sealed to (tenant, subject, modality, model).
    rt = Runtime.open(services.settings)
    binding = TemplateBinding("bank-a", "cust-0042", "face", "sface-2021dec")
    envelope = rt.crypto.encrypt_template(binding, EMBEDDING.tobytes())
    rt.storage.templates.put(TemplateRecord("bank-a", "cust-0042", "face", "sface-2021dec", "", envelope,
                                            envelope_key_id(envelope), samples=1))
    logging.getLogger("biogate.test").info(f"enrolled {PHONE} id {ID_NUMBER}", extra={"embedding": EMBEDDING, "phone": PHONE})
    restored = np.frombuffer(rt.crypto.decrypt_template(binding, present(rt.storage.templates.get(
        "bank-a", "cust-0042", "face", "sface-2021dec")).envelope), dtype=np.float32)
    assert np.array_equal(restored, EMBEDDING)

    with services.channel("face", "dev-all") as channel:
        info = face_pb2_grpc.FaceServiceStub(channel).GetEnrollment(common_pb2.GetEnrollmentRequest(subject=subject))
        assert [t.model_id for t in info.templates] == ["sface-2021dec"]

    db = services.settings.sqlite_path.read_bytes() + b"".join(
        p.read_bytes() for p in services.settings.data_dir.glob("biogate.db-*"))
    assert PHONE.encode() not in db and PHONE_LOCAL.encode() not in db
    assert EMBEDDING.tobytes()[:32] not in db

    with services.channel("mfa", "dev-admin") as channel:
        erased = mfa_pb2_grpc.MfaServiceStub(channel).DeleteSubject(
            common_pb2.DeleteSubjectRequest(subject=subject, reason="gdpr-art17"))
    assert erased.templates_deleted == 1 and erased.contact_erased
    assert rt.storage.templates.list_for_subject("bank-a", "cust-0042") == []
    assert rt.storage.subjects.get_phone("bank-a", "cust-0042") is None
    assert rt.storage.subjects.get_consents("bank-a", "cust-0042") == []

    rows = list(rt.storage.audit.iter_records())
    events = [r.event_type for r in rows]
    # The first start made the keys (the serve supervisor's preparation, then the MFA its token key),
    # each audited; then the flow's own events.
    made = [(r.event_type, json.loads(r.details)["key"], r.actor) for r in rows if r.event_type.startswith("keys.")]
    assert made == [("keys.added", "audit-signing", "service:serve"),
                    ("keys.adding", "kek", "service:serve"), ("keys.adding", "pseudonym", "service:serve"),
                    ("keys.added", "kek", "service:serve"), ("keys.added", "pseudonym", "service:serve"),
                    ("keys.adding", "mfa-token-signing", "service:mfa"),
                    ("keys.added", "mfa-token-signing", "service:mfa")]
    assert events[len(made):] == ["consent.recorded", "contact.phone_set", "face.subject_deleted",
                                  "voice.subject_deleted", "subject.erased"]
    audit_text = "\n".join(f"{r.actor} {r.tenant_id} {r.subject_pseudonym} {r.details}" for r in rows)
    assert "cust-0042" not in audit_text and secrets_in(audit_text) == []
    assert verify(rt.storage.audit, AuditSigner.load_or_create(services.settings.audit_signing_key_file).public_key).ok

    logs = captured_logs.getvalue()
    assert '"rpc": "SetPhoneNumber"' in logs and "enrolled" in logs  # the logs were captured
    assert secrets_in(logs) == [], secrets_in(logs)
    rt.close()


def test_enrolment_info_and_erasure_validate_their_input(services):
    services.start("face")
    with services.channel("face", "dev-all") as channel:
        stub = face_pb2_grpc.FaceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetEnrollment(common_pb2.GetEnrollmentRequest(subject=common_pb2.SubjectRef(tenant_id="bank-a")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "subject.subject_id" in details_of(err.value)["fields"]
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteSubject(common_pb2.DeleteSubjectRequest(
                subject=common_pb2.SubjectRef(tenant_id="bank-a", subject_id="c 1; drop table")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sqlite_database_is_in_wal_mode(services):
    services.start("mfa")
    with sqlite3.connect(services.settings.sqlite_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
