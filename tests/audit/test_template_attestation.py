"""`biogate audit templates`: each template is the one its latest audit record names. A database
writer who puts back an older envelope of the same subject (it opens: the binding is the same), swaps
in another, deletes one or restores one after its erasure is reported; rotation and erasure are not.
Through the real enrolment and erasure code (services/common/modality, services/common/subjects) on
SQLite and PostgreSQL; the attacker writes SQL or uses the storage without the audit."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from services.commands import audit as audit_cli
from services.common.api.v1 import common_pb2
from services.common.audit.templates import check_templates
from services.common.crypto import payload_digest
from services.common.context import SYSTEM
from services.common.crypto.rotation import rotate
from services.common.modality.templates import Templates
from services.common.runtime import Runtime
from services.common.storage import ConsentRecord, SqlStorage, TemplateRecord
from services.common.storage.interfaces import Modality
from services.common.subjects import delete_modality
from tests.conftest import make_settings

T, S = "bank-a", "cust-7731"


@pytest.fixture
def rt(tmp_path, storage_dsn):
    runtime = Runtime.open(make_settings(tmp_path / "data", storage={"dsn": storage_dsn}))
    runtime.storage.subjects.record_consent(ConsentRecord(T, S, "biometric_verification", ("face", "voice"), "v1"))
    yield runtime
    runtime.close()


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=8).astype(np.float32)
    return v / np.linalg.norm(v)


def _enrol(rt, modality: Modality, seed: int, subject: str = S, channel: str = "", replace: bool = False):
    stored, _ = Templates(rt, modality).enrol(T, subject, f"{modality}-model", _vec(seed), channel=channel, samples=1,
                                              quality={}, replace=replace, details={"replace": replace},
                                              caller=SYSTEM)
    return stored


def _erase(rt, modality: Modality, subject: str = S) -> None:
    delete_modality(rt, common_pb2.DeleteSubjectRequest(
        subject=common_pb2.SubjectRef(tenant_id=T, subject_id=subject), reason="customer_request"), modality, caller=SYSTEM)


def _check(rt, capsys, *options: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="biogate")
    audit_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "templates", *options])
    code = args.func(rt.settings, args)
    out = capsys.readouterr().out
    assert S not in out  # the report names pseudonyms, never subject ids
    return code, out


def _details(rt) -> dict:
    last = rt.storage.audit.last()
    assert last is not None
    return json.loads(last.details)


def test_enrolment_and_erasure_records_name_the_sealed_template(rt):
    face = _enrol(rt, "face", 1)
    assert _details(rt)["payload_digest"] == payload_digest(face.envelope)
    tel = _enrol(rt, "voice", 2, channel="telephone")
    wide = _enrol(rt, "voice", 3, channel="wideband")
    assert _details(rt) | {"replace": False} == {"model_id": "voice-model", "channel": "wideband", "replace": False,
                                                 "payload_digest": payload_digest(wide.envelope)}
    _erase(rt, "voice")
    deleted = _details(rt)["deleted"]
    assert sorted((d["channel"], d["payload_digest"]) for d in deleted) == sorted(
        [("telephone", payload_digest(tel.envelope)), ("wideband", payload_digest(wide.envelope))])
    assert _details(rt)["templates_deleted"] == 2


def test_an_older_envelope_put_back_after_a_re_enrolment_is_reported(rt, attacker, capsys):
    old = _enrol(rt, "face", 1)
    new = _enrol(rt, "face", 2, replace=True)
    assert _check(rt, capsys)[0] == 0
    attacker.execute("UPDATE templates SET envelope = ? WHERE id = ?", (old.envelope, new.id))
    # The attack: the template from before the re-enrolment opens and is what Verify compares with.
    assert np.array_equal(Templates(rt, "face").for_verification(T, S, "face-model"), _vec(1))
    code, out = _check(rt, capsys)
    assert code == 1 and "templates: FAILED" in out and "audit trail: OK" in out
    assert (f"ROLLED-BACK {T}/{rt.pseudonymize(T, S)} face model face-model (template {new.id}): its sealed "
            "payload is not the one the audit record at seq") in out


def test_another_enrolment_of_the_same_subject_swapped_in_is_reported(rt, attacker, capsys):
    tel = _enrol(rt, "voice", 1, channel="telephone")
    _enrol(rt, "voice", 2, channel="wideband")
    wide = _enrol(rt, "voice", 3, channel="wideband", replace=True)
    face = _enrol(rt, "face", 4)
    other = _enrol(rt, "face", 5, subject="cust-other")
    attacker.execute("UPDATE templates SET envelope = ? WHERE id = ?", (tel.envelope, wide.id))
    attacker.execute("UPDATE templates SET envelope = ? WHERE id = ?", (other.envelope, face.id))
    code, out = _check(rt, capsys)
    assert code == 1 and "2 findings" in out
    assert f"ROLLED-BACK {T}/{rt.pseudonymize(T, S)} voice model voice-model channel wideband (template {wide.id})" in out
    assert f"ROLLED-BACK {T}/{rt.pseudonymize(T, S)} face model face-model (template {face.id})" in out
    assert "channel telephone" not in out


def test_a_template_deleted_or_restored_outside_biogate_is_reported(rt, attacker, capsys):
    tel = _enrol(rt, "voice", 1, channel="telephone")
    _enrol(rt, "voice", 2, channel="wideband")
    attacker.execute("DELETE FROM templates WHERE id = ?", (tel.id,))
    code, out = _check(rt, capsys)
    assert code == 1 and (f"MISSING {T}/{rt.pseudonymize(T, S)} voice model voice-model channel telephone: the audit "
                          "record at seq") in out and "deleted outside BioGate" in out
    face = _enrol(rt, "face", 3)
    _erase(rt, "face")
    rt.storage.templates.put(face)  # a row from a backup, written without the services and their audit
    code, out = _check(rt, capsys)
    assert code == 1 and "2 findings" in out
    assert f"NOT-AUDITED {T}/{rt.pseudonymize(T, S)} face model face-model (template {face.id}): the audit record " in out
    assert "restored outside BioGate" in out
    rt.storage.templates.put(TemplateRecord(T, "cust-new", "face", "face-model", "", face.envelope, face.key_id, 1))
    assert "no audit record wrote it: written outside BioGate" in _check(rt, capsys)[1]


def test_key_rotation_erasure_and_re_enrolment_leave_no_finding(rt, capsys):
    face = _enrol(rt, "face", 1)
    _enrol(rt, "voice", 2, channel="telephone")
    _enrol(rt, "voice", 3, channel="wideband")
    assert rotate(rt.storage, rt.keyring).templates_rewrapped == 3
    moved = rt.storage.templates.get(T, S, "face", "face-model")
    assert moved is not None and moved.envelope != face.envelope and moved.key_id != face.key_id
    assert payload_digest(moved.envelope) == payload_digest(face.envelope)  # re-wrap keeps the sealed payload
    code, out = _check(rt, capsys)
    assert code == 0 and "templates: OK; 3 checked, 0 findings, 0 unattested" in out
    _erase(rt, "face")
    _erase(rt, "voice")
    assert _check(rt, capsys)[0] == 0
    _enrol(rt, "face", 4)  # enrolled again after the erasure
    code, out = _check(rt, capsys)
    assert code == 0 and "1 checked, 0 findings" in out


def _legacy_enrol(rt, seed: int) -> TemplateRecord:
    """An enrolment as the code before the digests wrote it: its record names no payload."""
    envelope, key_id = Templates(rt, "face").vault.seal(T, S, "face-model", _vec(seed))
    with rt.storage.transaction():
        stored = rt.storage.templates.put(TemplateRecord(T, S, "face", "face-model", "", envelope, key_id, 1),
                                          replace=True)
        rt.audit.append("face.enrolled", "service:face", T, S, {"model_id": "face-model", "samples": 1})
    return stored


def test_legacy_templates_are_unattested_until_attested_and_then_checked(rt, attacker, capsys):
    first = _legacy_enrol(rt, 1)
    current = _legacy_enrol(rt, 2)
    _enrol(rt, "voice", 3, channel="telephone")
    code, out = _check(rt, capsys)
    assert code == 0 and "2 checked, 0 findings, 1 unattested, 0 attested now" in out
    assert f"UNATTESTED {T}/{rt.pseudonymize(T, S)} face model face-model (template {current.id})" in out
    code, out = _check(rt, capsys, "--attest-legacy")
    assert code == 0 and "1 unattested" not in out and "0 unattested, 1 attested now" in out
    record = rt.storage.audit.last()
    assert record.event_type == "face.template_attested" and record.actor.startswith("cli:")
    assert json.loads(record.details)["payload_digest"] == payload_digest(current.envelope)
    assert "0 unattested, 0 attested now" in _check(rt, capsys)[1]
    attacker.execute("UPDATE templates SET envelope = ? WHERE id = ?", (first.envelope, current.id))
    code, out = _check(rt, capsys)
    assert code == 1 and f"ROLLED-BACK {T}/{rt.pseudonymize(T, S)} face model face-model" in out


def test_a_legacy_template_deleted_outside_biogate_is_missing_without_a_digest(rt, attacker, capsys):
    legacy = _legacy_enrol(rt, 1)
    attacker.execute("DELETE FROM templates WHERE id = ?", (legacy.id,))
    code, out = _check(rt, capsys, "--attest-legacy")
    assert code == 1 and f"MISSING {T}/{rt.pseudonymize(T, S)} face model face-model" in out


def test_a_trail_that_does_not_verify_fails_and_attests_nothing(rt, attacker, capsys):
    _legacy_enrol(rt, 1)
    attacker.execute("UPDATE audit_records SET actor = 'someone' WHERE seq = 1")
    code, out = _check(rt, capsys, "--attest-legacy")
    assert code == 1 and "audit trail: FAILED" in out and "seq 1: content does not match its hash" in out
    assert "1 unattested, 0 attested now" in out and "the trail did not verify" in out
    assert rt.storage.audit.last().event_type == "face.enrolled"


def test_a_template_written_while_the_check_runs_is_left_to_the_next_run(rt, capsys):
    _enrol(rt, "face", 1)
    templates = rt.storage.templates
    walk = templates.iter_all

    def re_enrolled_after_the_trail_was_read(batch: int = 1000):
        _enrol(rt, "face", 2, replace=True)  # a service re-enrols between the two passes
        _enrol(rt, "voice", 3, channel="telephone")
        _erase(rt, "voice")
        return walk(batch)

    templates.iter_all = re_enrolled_after_the_trail_was_read
    try:
        report = check_templates(rt.storage, rt.audit._signer.public_key, rt.pseudonymize)
    finally:
        del templates.iter_all
    assert report.ok and report.deferred == 1 and report.templates_checked == 1
    assert _check(rt, capsys)[0] == 0


def _after_the_walk(rt, act):
    """Runs ``act`` between the check's walk of the trail and its pass over the templates."""
    templates = rt.storage.templates
    walk = templates.iter_all

    def acted(batch: int = 1000):
        act()
        return walk(batch)

    templates.iter_all = acted
    try:
        return check_templates(rt.storage, rt.audit._signer.public_key, rt.pseudonymize)
    finally:
        del templates.iter_all


def _rolled_back(rt, attacker):
    old = _enrol(rt, "face", 1)
    new = _enrol(rt, "face", 2, replace=True)
    attacker.execute("UPDATE templates SET envelope = ? WHERE id = ?", (old.envelope, new.id))
    return old


def test_a_record_forged_after_the_walk_defers_no_finding(rt, attacker):
    """The records after the walk decide which findings are left to the next run, and were read
    unchecked: a record chained on by hand (SHA-256 needs no key), naming the rolled-back slot, made
    the check pass (1 "written while checking", the rollback unreported)."""
    old = _rolled_back(rt, attacker)
    details = json.dumps({"model_id": "face-model", "payload_digest": payload_digest(old.envelope)},
                         sort_keys=True, separators=(",", ":"))
    report = _after_the_walk(rt, lambda: attacker.forge(rt.storage, "face.enrolled", "face-service", T,
                                                        rt.pseudonymize(T, S), details))
    assert not report.ok and report.deferred == 0
    assert [f.kind for f in report.findings] == ["rolled-back"]
    assert any("records after the signed head" in p for p in report.chain.problems), report.chain.problems


def test_a_record_altered_after_the_walk_defers_no_finding(rt, attacker):
    """A record a service appended during the check, then altered to name the rolled-back slot."""
    _rolled_back(rt, attacker)

    def enrol_then_alter():
        _enrol(rt, "voice", 3, channel="telephone")
        attacker.execute("UPDATE audit_records SET event_type = 'face.enrolled', details = ? WHERE seq = ?",
                         (json.dumps({"model_id": "face-model", "payload_digest": "0" * 64}),
                          rt.storage.audit.last().seq))
    report = _after_the_walk(rt, enrol_then_alter)
    assert not report.ok and report.deferred == 0
    assert "rolled-back" in [f.kind for f in report.findings]
    assert any("content does not match its hash" in p for p in report.chain.problems), report.chain.problems


def test_a_record_deleted_after_the_walk_is_reported(rt, attacker):
    """A re-enrolment during the check whose record was then deleted: its template is reported and
    so is the trail, which now ends before its signed head."""
    _enrol(rt, "face", 1)

    def re_enrol_then_delete():
        _enrol(rt, "face", 2, replace=True)
        attacker.execute("DELETE FROM audit_records WHERE seq = ?", (rt.storage.audit.last().seq,))
    report = _after_the_walk(rt, re_enrol_then_delete)
    assert not report.ok and report.deferred == 0
    assert any("dropped" in p for p in report.chain.problems), report.chain.problems


def test_an_erasure_racing_an_enrolment_leaves_the_trail_and_the_templates_agreeing(tmp_path, pg_dsn):
    """PostgreSQL, read committed: an erasure whose DELETE ran while an enrolment of the same subject
    was not yet committed missed that template, yet its audit record came after the enrolment's: the
    trail said erased over a template that stayed. The erasure now waits for the enrolment."""
    import threading
    import time

    import psycopg

    rt = Runtime.open(make_settings(tmp_path / "data", storage={"dsn": pg_dsn}))
    try:
        rt.storage.subjects.record_consent(ConsentRecord(T, S, "biometric_verification", ("face",), "v1"))
        envelope, key_id = Templates(rt, "face").vault.seal(T, S, "face-model", _vec(1))
        erasure = threading.Thread(target=_erase, args=(rt, "face"))
        with rt.storage.transaction():  # the enrolment, held open until the erasure waits on it
            rt.storage.templates.put(TemplateRecord(T, S, "face", "face-model", "", envelope, key_id, 1))
            rt.audit.append("face.enrolled", "service:face", T, S, {"model_id": "face-model",
                                                                    "payload_digest": payload_digest(envelope)})
            assert isinstance(rt.storage, SqlStorage)
            with rt.storage.db.transaction() as session:  # the enrolment's own connection
                pid = session.one("SELECT pg_backend_pid()")
                assert pid is not None
                enrolling = pid[0]
            erasure.start()
            with psycopg.connect(pg_dsn, autocommit=True) as watch:
                deadline = time.monotonic() + 60
                while not watch.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                                        (enrolling,)).fetchone()[0]:  # type: ignore[index]  # COUNT(*): one row
                    assert time.monotonic() < deadline, "the erasure never reached the enrolment's locks"
                    time.sleep(0.01)
        erasure.join(60)
        assert rt.storage.templates.list_for_subject(T, S) == []
        report = check_templates(rt.storage, rt.audit._signer.public_key, rt.pseudonymize)
        assert report.ok and not report.findings, report.render()
    finally:
        rt.close()


def test_a_trail_rolled_back_with_its_templates_is_reported_against_the_anchors(rt, attacker, tmp_path, capsys):
    """A database writer restores an old backup of both the trail and the templates: each template is
    the one its (rolled-back) latest record names and the old head verifies, so only the anchors written
    meanwhile show it. The hourly CronJob passes --anchors (tests/deploy/test_kubernetes.py)."""
    old = _enrol(rt, "face", 1)
    backup_head = rt.storage.audit.head()
    anchors = tmp_path / "worm"
    new = _enrol(rt, "face", 2, replace=True)
    assert audit_cli.cmd_anchor(rt.settings, argparse.Namespace(to=anchors, public_key=None,
                                                               full_anchor_check=False)) == 0
    assert _check(rt, capsys, "--anchors", str(anchors))[0] == 0
    attacker.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (backup_head.seq,))
    attacker.execute("DELETE FROM audit_records WHERE seq > ?", (backup_head.seq,))
    attacker.execute("UPDATE audit_head SET seq = ?, hash = ?, signature = ?, key_id = ?",
                     (backup_head.seq, backup_head.hash, bytes(backup_head.signature), backup_head.key_id))
    attacker.execute("UPDATE templates SET envelope = ? WHERE id = ?", (old.envelope, new.id))
    code, out = _check(rt, capsys)
    assert code == 0 and "audit trail: OK" in out  # consistent with each other: the trail alone cannot tell
    code, out = _check(rt, capsys, "--anchors", str(anchors))
    assert code == 1 and "audit trail: FAILED" in out
    assert "an externally kept checkpoint is beyond the end of the trail (truncated)" in out
