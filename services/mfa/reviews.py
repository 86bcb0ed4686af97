"""The human review queue: REVIEW decisions wait here for an administrator's approval or
rejection; every resolution is an audit record."""

from __future__ import annotations

import base64
import json
from datetime import datetime

from services.common import errors
from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.audit import AuditLog
from services.common.privacy import redact
from services.common.subjects import timestamp
from services.common.validation import identifier

from .reasons import Reason
from .storage import MfaStore, ReviewRecord

STATUSES = ("pending", "approved", "rejected")
MAX_PAGE = 100
MAX_NOTE = 1000


def to_proto(rec: ReviewRecord) -> mfa_pb2.Review:
    return mfa_pb2.Review(
        review_id=rec.id, session_id=rec.session_id,
        subject=common_pb2.SubjectRef(tenant_id=rec.tenant_id, subject_id=rec.subject_id),
        action=rec.action, reasons=[Reason.from_json(r).to_proto() for r in rec.reasons],
        created_at=timestamp(rec.created_at), status=rec.status, resolved_by=rec.resolved_by,
    )


def _page_token(rec: ReviewRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([rec.created_at.isoformat(), rec.id]).encode()).decode()


def _after(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        created, rid = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(created), identifier(rid, "page_token")
    except (ValueError, TypeError, errors.ServiceError):
        raise errors.invalid_argument("page_token is not one this service issued", page_token="malformed") from None


class ReviewQueue:
    def __init__(self, store: MfaStore, audit: AuditLog) -> None:
        self.store, self.audit = store, audit

    def open(self, tenant: str, subject: str, session_id: str, action: str, reasons: tuple[Reason, ...],
             review_id: str) -> ReviewRecord:
        return self.store.reviews.create(ReviewRecord(tenant, subject, session_id, action,
                                                        tuple(r.to_json() for r in reasons), id=review_id))

    def list(self, request: mfa_pb2.ListReviewsRequest) -> mfa_pb2.ListReviewsResponse:
        tenant = identifier(request.tenant_id, "tenant_id")
        status = request.status or "pending"
        if status not in STATUSES:
            raise errors.invalid_argument(f"status must be one of {', '.join(STATUSES)}", status="unknown status")
        if request.page_size < 0 or request.page_size > MAX_PAGE:
            raise errors.invalid_argument(f"page_size must be 0..{MAX_PAGE}", page_size="out of range")
        size = request.page_size or 20
        rows = self.store.reviews.list(tenant, status, size + 1, _after(request.page_token))
        more = len(rows) > size
        rows = rows[:size]
        return mfa_pb2.ListReviewsResponse(reviews=[to_proto(r) for r in rows],
                                           next_page_token=_page_token(rows[-1]) if more else "")

    def tenant_of(self, review_id: str) -> str | None:
        """For the server's tenant check: the review's tenant, None for no such review."""
        rec = self.store.reviews.get(review_id) if review_id else None
        return rec.tenant_id if rec is not None else None

    def get(self, review_id: str) -> ReviewRecord:
        rec = self.store.reviews.get(identifier(review_id, "review_id"))
        if rec is None:
            raise errors.not_found("no such review", "REVIEW_NOT_FOUND")
        return rec

    def resolve(self, rec: ReviewRecord, approve: bool, note: str, actor: str) -> ReviewRecord:
        if len(note) > MAX_NOTE:
            raise errors.invalid_argument(f"note is longer than {MAX_NOTE} characters", note="too long")
        status = "approved" if approve else "rejected"
        done = self.store.reviews.resolve(rec.id, status, actor, redact(note))
        if done is None:
            raise errors.failed_precondition("the review was already resolved", "REVIEW_ALREADY_RESOLVED")
        self.audit.append("mfa.review_resolved", actor, rec.tenant_id, rec.subject_id,
                          {"review_id": rec.id, "session_id": rec.session_id, "outcome": status,
                           "action": rec.action, "note_chars": len(note)})
        return done
