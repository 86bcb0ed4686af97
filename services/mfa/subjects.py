"""Consent, contact and erasure RPCs of the MfaService (PIPL art. 28/29, GDPR art. 9/17)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone

import grpc

from services.common import errors
from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.context import Principal
from services.common.crypto import envelope_key_id
from services.common.privacy import mask_phone
from services.common.runtime import Runtime
from services.common.storage import ConsentRecord, StillReferencedError
from services.common.subjects import MODALITY_ENUMS, MODALITY_NAMES, timestamp
from services.common.validation import identifier, label, subject_ref

from .clients import BiometricClient, ServiceUnavailable
from .storage import MfaStore

ERASED_BY = ("face", "voice")  # the services holding templates, each erasing its own
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")  # fullmatch, ASCII digits: \d takes any script's


def _purpose(value: int, field: str) -> str:
    if value == common_pb2.CONSENT_PURPOSE_UNSPECIFIED or value not in common_pb2.ConsentPurpose.values():
        raise errors.invalid_argument(f"{field} must name a consent purpose", **{field.replace(".", "__"): "unspecified"})
    return common_pb2.ConsentPurpose.Name(value).removeprefix("CONSENT_PURPOSE_").lower()


def _to_proto(rec: ConsentRecord) -> common_pb2.Consent:
    return common_pb2.Consent(
        subject=common_pb2.SubjectRef(tenant_id=rec.tenant_id, subject_id=rec.subject_id),
        purpose="CONSENT_PURPOSE_" + rec.purpose.upper(),
        modalities=[MODALITY_ENUMS[m] for m in rec.modalities],
        granted=rec.granted,
        policy_version=rec.policy_version,
        evidence_ref=rec.evidence_ref,
        recorded_at=timestamp(rec.recorded_at),
        withdrawn_at=timestamp(rec.withdrawn_at) if rec.withdrawn_at else None,
    )


def record_consent(rt: Runtime, request: common_pb2.RecordConsentRequest, *,
                   caller: Principal) -> common_pb2.RecordConsentResponse:
    c = request.consent
    tenant, subject = subject_ref(c.subject, "consent.subject")
    purpose = _purpose(c.purpose, "consent.purpose")
    names = {MODALITY_NAMES.get(m) for m in c.modalities}
    modalities = tuple(sorted(n for n in names if n is not None))
    if not names or None in names:
        raise errors.invalid_argument("consent.modalities must list face and/or voice", consent__modalities="empty or unspecified")
    if not c.granted:
        raise errors.invalid_argument("a consent is recorded as granted; use WithdrawConsent to withdraw", consent__granted="must be true")
    policy = identifier(c.policy_version, "consent.policy_version")
    evidence = label(c.evidence_ref, "consent.evidence_ref", 256)
    with rt.storage.transaction():  # the consent and its audit record, or neither
        rec = rt.storage.subjects.record_consent(
            ConsentRecord(tenant, subject, purpose, modalities, policy, evidence_ref=evidence)
        )
        rt.audit.append("consent.recorded", caller.name, tenant, subject,
                        {"purpose": purpose, "modalities": list(modalities), "policy_version": policy})
    return common_pb2.RecordConsentResponse(consent=_to_proto(rec))


def withdraw_consent(rt: Runtime, request: common_pb2.WithdrawConsentRequest, *,
                     caller: Principal) -> common_pb2.WithdrawConsentResponse:
    tenant, subject = subject_ref(request.subject)
    purpose = _purpose(request.purpose, "purpose")
    with rt.storage.transaction():  # the withdrawal and its audit record, or neither
        rec = rt.storage.subjects.withdraw_consent(tenant, subject, purpose)
        if rec is None:
            raise errors.not_found("no consent of that purpose is recorded for this subject", reason="NO_CONSENT")
        rt.audit.append("consent.withdrawn", caller.name, tenant, subject, {"purpose": purpose})
    return common_pb2.WithdrawConsentResponse(consent=_to_proto(rec))


def get_consent(rt: Runtime, request: common_pb2.GetConsentRequest) -> common_pb2.GetConsentResponse:
    tenant, subject = subject_ref(request.subject)
    return common_pb2.GetConsentResponse(consents=[_to_proto(r) for r in rt.storage.subjects.get_consents(tenant, subject)])


def delete_subject(rt: Runtime, store: MfaStore, clients: dict[str, BiometricClient],
                   request: common_pb2.DeleteSubjectRequest, budget: float | None,
                   rate_keys: Callable[[str, str], list[str]], *, caller: Principal) -> common_pb2.DeleteSubjectResponse:
    """Erases the subject in every modality. The face and voice services erase their templates
    through their own DeleteSubject (each with its audit record); then, in one transaction with the
    audit record, the MFA erases its own rows (devices, OTP state, sessions, reviews, lockouts,
    signals) and the shared subject record (consents, phone number, challenges). A service that
    cannot be reached fails the call with UNAVAILABLE naming it, before anything of the MFA's is
    erased; every step is idempotent, so a retry completes the erasure. The audit keeps counts only.
    ``rate_keys(tenant, subject)``: the rate-limit counters kept under the subject's pseudonym or
    phone number, erased with the rest."""
    tenant, subject = subject_ref(request.subject)
    reason = identifier(request.reason, "reason") if request.reason else "unspecified"
    forwarded = common_pb2.DeleteSubjectRequest(subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject),
                                                reason=request.reason)
    templates: dict[str, int] = {}
    down: list[ServiceUnavailable] = []
    for name in ERASED_BY:
        try:
            templates[name] = clients[name].call("DeleteSubject", forwarded, True, budget).templates_deleted
        except ServiceUnavailable as exc:
            down.append(exc)
    if down:
        names = " and ".join(f"the {exc.service} service ({exc.why})" for exc in down)
        raise errors.unavailable(
            f"{names} could not erase the subject's templates; nothing else was erased: retry DeleteSubject",
            "_AND_".join(exc.service.upper() for exc in down) + "_SERVICE_UNAVAILABLE")
    try:
        with rt.storage.transaction():  # the erasure and its audit record land together or not at all
            counters = sum(rt.storage.rate_limits.reset(key) for key in rate_keys(tenant, subject))
            own = store.erase_subject(tenant, subject)
            shared = rt.storage.erase_subject(tenant, subject)
            row = rt.audit.append("subject.erased", caller.name, tenant, subject, {
                "reason": reason, "templates": sum(templates.values()), "devices": own.devices,
                "otp_challenges": own.otp, "sessions": own.sessions, "consents": shared.consents,
                "contact_erased": shared.contact_erased, "rate_counters": counters,
            })
    except StillReferencedError:
        raise errors.ServiceError(grpc.StatusCode.ABORTED, "a template was enrolled while the subject was being "
                                  "erased; retry DeleteSubject", "ERASURE_RACED") from None
    return common_pb2.DeleteSubjectResponse(
        templates_deleted=sum(templates.values()), devices_deleted=own.devices,
        contact_erased=shared.contact_erased, audit_record_id=str(row.seq),
    )


def set_phone_number(rt: Runtime, request: mfa_pb2.SetPhoneNumberRequest, store: MfaStore | None = None,
                     now: datetime | None = None, *, caller: Principal) -> mfa_pb2.SetPhoneNumberResponse:
    """A number replacing another one starts the SIM-swap cooling-off (the subject's signals)."""
    tenant, subject = subject_ref(request.subject)
    phone = request.phone_e164.replace(" ", "")
    if not _E164.fullmatch(phone):
        raise errors.invalid_argument("phone_e164 must be an E.164 number such as +8613812345678",
                                      phone_e164="not E.164")
    envelope = rt.crypto.encrypt_contact(tenant, subject, phone)
    previous = rt.storage.subjects.get_phone(tenant, subject)
    changed = previous is not None and rt.crypto.decrypt_contact(tenant, subject, previous[0]) != phone
    with rt.storage.transaction():  # the number, the change signal and the audit record, or none
        rt.storage.subjects.set_phone(tenant, subject, envelope, envelope_key_id(envelope))
        if changed and store is not None:
            store.subject_signals.phone_changed(tenant, subject, now or datetime.now(timezone.utc))
        rt.audit.append("contact.phone_set", caller.name, tenant, subject, {"changed": changed})
    return mfa_pb2.SetPhoneNumberResponse(masked_phone=mask_phone(phone))
