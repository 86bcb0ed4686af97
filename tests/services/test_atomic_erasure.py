import pytest
from services.common.audit import AuditDataError
from services.common.runtime import Runtime
from services.common.storage import TemplateRecord
from tests.conftest import make_settings

def test_erasure_and_audit_are_one_transaction(tmp_path):
    rt = Runtime.open(make_settings(tmp_path))
    rt.storage.templates.put(TemplateRecord("t", "s1", "face", "m", "", b"x", "k", 1))
    before = rt.storage.audit.last()  # the first start's key records
    assert before is not None and before.event_type.startswith("keys.")
    with pytest.raises(AuditDataError):
        with rt.storage.transaction():
            rt.storage.templates.delete_for_subject("t", "s1", "face")
            rt.audit.append("face.subject_deleted", "a", "t", "s1", {"phone": "+8613812345678"})
    assert len(rt.storage.templates.list_for_subject("t", "s1")) == 1
    assert rt.storage.audit.last() == before
