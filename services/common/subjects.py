"""Subject operations shared by the face and voice services: enrolment info and erasure of one
modality's templates, each leaving an audit record."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.api.v1 import common_pb2
from services.common.context import Principal
from services.common.audit.templates import slot_details
from services.common.runtime import Runtime
from services.common.storage import TemplateRecord
from services.common.storage.interfaces import Modality
from services.common.validation import identifier, subject_ref

# Consent purposes as stored: the names of biogate.v1.ConsentPurpose without their prefix.
VERIFICATION = "biometric_verification"  # enrolment and 1:1 verification
IDENTIFICATION = "biometric_identification"  # inclusion in 1:N galleries

MODALITY_NAMES: dict[common_pb2.Modality, Modality] = {common_pb2.MODALITY_FACE: "face", common_pb2.MODALITY_VOICE: "voice"}
MODALITY_ENUMS = {v: k for k, v in MODALITY_NAMES.items()}


def timestamp(value) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(value)
    return ts


def template_info(rec: TemplateRecord, active_models: set[str]) -> common_pb2.TemplateInfo:
    return common_pb2.TemplateInfo(
        modality=MODALITY_ENUMS[rec.modality],
        model_id=rec.model_id,
        channel=rec.channel,
        samples=rec.samples,
        model_active=rec.model_id in active_models,
        created_at=timestamp(rec.created_at),
        updated_at=timestamp(rec.updated_at),
    )


def get_enrollment(rt: Runtime, request: common_pb2.GetEnrollmentRequest, modality: Modality) -> common_pb2.GetEnrollmentResponse:
    tenant, subject = subject_ref(request.subject)
    active = {m.id for m in rt.models.manifest.models if m.active}
    records = rt.storage.templates.list_for_subject(tenant, subject, modality)
    return common_pb2.GetEnrollmentResponse(templates=[template_info(r, active) for r in records])


def delete_modality(rt: Runtime, request: common_pb2.DeleteSubjectRequest, modality: Modality,
                    caller: Principal) -> common_pb2.DeleteSubjectResponse:
    tenant, subject = subject_ref(request.subject)
    reason = identifier(request.reason, "reason") if request.reason else "unspecified"
    # One transaction: the erasure and its audit record land together or not at all.
    # The record names each sealed template it deleted (what `biogate audit templates` checks against).
    with rt.storage.transaction():
        deleted = rt.storage.templates.erase_for_subject(tenant, subject, modality)
        row = rt.audit.append(f"{modality}.subject_deleted", caller.name, tenant, subject, {
            "templates_deleted": len(deleted), "reason": reason,
            "deleted": [slot_details(r.model_id, r.channel, r.envelope) for r in deleted]})
    return common_pb2.DeleteSubjectResponse(templates_deleted=len(deleted), audit_record_id=str(row.seq))

