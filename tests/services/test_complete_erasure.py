"""MfaService.DeleteSubject erases the subject in every modality and every store: after it, no row of
any table names the subject or its pseudonym (the audit trail aside, which keeps the erasure's own
record by design), and no replay fingerprint is left in Redis or the database — on SQLite with the
database replay store and on PostgreSQL with Redis."""

from __future__ import annotations

import re
import uuid

import pytest
import redis
import soundfile as sf

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc, voice_pb2, voice_pb2_grpc
from services.common.runtime import Runtime
from tests.conftest import ServiceHarness, make_settings

REDIS_URL = "redis://127.0.0.1:6379/0"
IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def wav(path) -> bytes:
    import io

    x, rate = sf.read(path, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def tables(storage) -> dict[str, list[str]]:
    """Every table and its text-like columns."""
    with storage.db.read() as s:
        if storage.dialect == "sqlite":
            names = [r[0] for r in s.all("SELECT name FROM sqlite_master WHERE type = 'table'"
                                         " AND name NOT LIKE 'sqlite_%'")]
            out: dict[str, list[str]] = {}
            for name in names:
                assert IDENT.match(name)
                cols = s.all(f"PRAGMA table_info({name})")
                out[name] = [c[1] for c in cols if (c[2] or "").upper() in ("TEXT", "")]
            return out
        rows = s.all("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema ="
                     " current_schema() AND data_type IN ('text', 'character varying')")
    out = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    return out


def rows_naming(storage, needles: list[str]) -> dict[str, int]:
    """table -> rows with a text column holding one of ``needles`` (whole or inside a key)."""
    found: dict[str, int] = {}
    with storage.db.read() as s:
        for table, columns in tables(storage).items():
            if table.startswith("audit") or table.startswith("schema_"):
                continue
            for column in columns:
                assert IDENT.match(column)
                for needle in needles:
                    n = s.one(f"SELECT count(*) FROM {table} WHERE {column} = ? OR {column} LIKE ?",
                              (needle, f"%{needle}%"))[0]
                    if n:
                        found[f"{table}.{column}"] = found.get(f"{table}.{column}", 0) + n
    return found


@pytest.mark.parametrize("backend, replay_store", [("sqlite", "database"), ("postgres", "redis")])
def test_mfa_erasure_leaves_nothing_of_the_subject_in_any_store(tmp_path, fixtures_dir, request, backend, replay_store):
    prefix = f"biogate-test:{uuid.uuid4().hex[:10]}"
    overrides = {"voice": {"replay_store": REDIS_URL if replay_store == "redis" else "database",
                           "replay_key_prefix": prefix}}
    if backend == "postgres":
        overrides["storage"] = {"dsn": request.getfixturevalue("pg_dsn")}
    settings = make_settings(tmp_path / "data", **overrides)
    harness = ServiceHarness(settings)
    try:
        face, voice = harness.start("face"), harness.start("voice")
        harness.settings = make_settings(tmp_path / "data", clients={
            "face": {"target": face.address}, "voice": {"target": voice.address}}, **overrides)
        harness.start("mfa")
        tenant, subject = "bank-e", "cust-erase-" + uuid.uuid4().hex[:8].translate(str.maketrans("0123456789", "ghijklmnop"))
        ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)
        with harness.channel("mfa") as ch_m, harness.channel("face") as ch_f, harness.channel("voice") as ch_v:
            mfa = mfa_pb2_grpc.MfaServiceStub(ch_m)
            mfa.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
                subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
                modalities=[common_pb2.MODALITY_FACE, common_pb2.MODALITY_VOICE], granted=True,
                policy_version="privacy-2026-01")))
            mfa.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"))
            photo = sorted((fixtures_dir / "face" / "identities").rglob("*.jpg"))[0]
            face_pb2_grpc.FaceServiceStub(ch_f).Enroll(face_pb2.EnrollFaceRequest(
                subject=ref, images=[common_pb2.Image(data=photo.read_bytes())]), timeout=120)
            clips = sorted((fixtures_dir / "voice" / "verification" / "libri_1688").glob("*.wav"),
                           key=lambda p: -p.stat().st_size)[:2]
            voice_pb2_grpc.VoiceServiceStub(ch_v).Enroll(voice_pb2.EnrollVoiceRequest(
                subject=ref, utterances=[common_pb2.Audio(data=wav(p)) for p in clips],
                channel=voice_pb2.VOICE_CHANNEL_WIDEBAND), timeout=300)
            mfa.StartAuthentication(mfa_pb2.StartAuthenticationRequest(
                subject=ref, channel=mfa_pb2.CHANNEL_IVR, action="login"))

            rt = Runtime.open(harness.settings)
            pseudonym = rt.pseudonymize(tenant, subject)
            client = redis.Redis.from_url(REDIS_URL)
            before = rows_naming(rt.storage, [subject, pseudonym])
            redis_before = list(client.scan_iter(f"{prefix}:*"))
            # the check can fail: every store held something of the subject before the erasure
            assert {"templates.subject_id", "consents.subject_id"} <= set(before), before
            assert (redis_before if replay_store == "redis" else before.get("voice_replay.subject_key")), before

            erased = mfa_pb2_grpc.MfaServiceStub(harness.channel("mfa", "dev-admin")).DeleteSubject(
                common_pb2.DeleteSubjectRequest(subject=ref, reason="gdpr-art17"))
            assert erased.templates_deleted == 2 and erased.contact_erased

            assert rows_naming(rt.storage, [subject, pseudonym]) == {}
            assert list(client.scan_iter(f"{prefix}:*")) == []
            events = [r.event_type for r in rt.storage.audit.iter_records()]
            assert events[-1] == "subject.erased" and "voice.subject_deleted" in events
            rt.close()
    finally:
        harness.stop()
        keys = list(redis.Redis.from_url(REDIS_URL).scan_iter(f"{prefix}:*"))
        if keys:
            redis.Redis.from_url(REDIS_URL).delete(*keys)
