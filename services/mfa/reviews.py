"""The human review queue. A REVIEW decision opens a case; an administrator's resolution, or the
expiry of a case nobody decided in time (``mfa.reviews.ttl_s``), is the session's final decision:
approve → ALLOW with a signed token, reject or expiry → DENY (no token: only an ALLOW is one). The
review's change, the session's decision, the audit record and the webhook event for the bank
commit in one transaction; the review moves out of 'pending' by compare-and-swap, so of two
reviewers racing one wins and the other is told.

Reviewers see the evidence the session gathered (reasons, factor outcomes with the operating
points that decided them, risk signals, action and amount), never a biometric sample or a
personal number: the payee only as its keyed hash, the place only as its country.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from services.common import context, errors
from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.audit import AuditLog
from services.common.privacy import redact
from services.common.subjects import timestamp
from services.common.validation import identifier

from . import metrics
from .config import ReviewsConfig
from .fusion import Decision, decide
from .reasons import Reason, to_protos
from .render import factor_result, factor_type
from .sessions import Session, Sessions
from .state import DecisionState, SessionState
from .storage import MfaStore, ReviewRecord
from .webhooks import WebhookOutbox

log = logging.getLogger("biogate.mfa.reviews")

STATUSES = ("pending", "approved", "rejected", "expired")
MAX_PAGE = 100
MAX_NOTE = 1000
SYSTEM = context.SYSTEM.name  # the actor of an expiry
OUTCOME_OF = {"approved": "allow", "rejected": "deny", "expired": "deny"}
CLOSING_REASON = {
    "approved": Reason("REVIEW_APPROVED", "a reviewer approved the session"),
    "rejected": Reason("REVIEW_REJECTED", "a reviewer rejected the session"),
    "expired": Reason("REVIEW_EXPIRED", "no reviewer decided the session in time"),
}

# Orchestrator._sign: an ALLOW as a signed token, with extra claims
Signer = Callable[[Session, Decision, datetime, dict[str, Any]], tuple[str, float]]


def to_proto(rec: ReviewRecord, expires_at: datetime | None = None) -> mfa_pb2.Review:
    out = mfa_pb2.Review(
        review_id=rec.id, session_id=rec.session_id,
        subject=common_pb2.SubjectRef(tenant_id=rec.tenant_id, subject_id=rec.subject_id),
        action=rec.action, reasons=[Reason.from_json(r).to_proto() for r in rec.reasons],
        created_at=timestamp(rec.created_at), status=rec.status, resolved_by=rec.resolved_by,
    )
    if expires_at is not None:
        out.expires_at.CopyFrom(timestamp(expires_at))
    if rec.resolved_at is not None:
        out.resolved_at.CopyFrom(timestamp(rec.resolved_at))
    return out


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


class _Lost(Exception):
    """Another resolution moved the review out of 'pending' first."""


class ReviewQueue:
    def __init__(self, store: MfaStore, audit: AuditLog, sessions: Sessions, sign: Signer, cfg: ReviewsConfig,
                 session_ttl_s: int, outbox: WebhookOutbox, clock: Callable[[], datetime]) -> None:
        self.store, self.audit, self.sessions, self.sign = store, audit, sessions, sign
        self.ttl = timedelta(seconds=cfg.ttl_s)
        self.session_ttl = timedelta(seconds=session_ttl_s)
        self.outbox, self.clock = outbox, clock
        self.notify: Callable[[], None] = lambda: None  # wakes the webhook worker (set by the server)

    def expires_at(self, rec: ReviewRecord) -> datetime:
        return rec.created_at + self.ttl

    def proto(self, rec: ReviewRecord) -> mfa_pb2.Review:
        return to_proto(rec, self.expires_at(rec))

    # ------------------------------------------------------------------ opening
    def open(self, session: Session, reasons: tuple[Reason, ...], review_id: str, now: datetime) -> ReviewRecord:
        """In the caller's (the decision's) transaction: the case; the session kept readable until the
        case is decided or expires, and a session lifetime after that (the bank reads the final
        decision with Decide); the webhook event."""
        rec = self.store.reviews.create(ReviewRecord(session.tenant_id, session.subject_id, session.id,
                                                     session.state.action, tuple(r.to_json() for r in reasons),
                                                     id=review_id, created_at=now))
        keep = max(session.expires_at, self.expires_at(rec) + self.session_ttl)
        self.sessions.mutate(session, lambda st: None, expires_at=keep)
        self.outbox.enqueue(rec.tenant_id, "review.opened", self._event(rec), now)
        return rec

    def _event(self, rec: ReviewRecord, decision: DecisionState | None = None) -> dict[str, Any]:
        """What the bank's webhook hears: ids, codes and times, no subject and no personal data."""
        data: dict[str, Any] = {
            "review_id": rec.id, "session_id": rec.session_id, "action": rec.action, "status": rec.status,
            "reasons": [Reason.from_json(r).code for r in rec.reasons], "created_at": rec.created_at.isoformat(),
            "expires_at": self.expires_at(rec).isoformat()}
        if rec.resolved_at is not None:
            data["resolved_at"] = rec.resolved_at.isoformat()
        if decision is not None:
            data["decision"] = {"outcome": decision.outcome, "reasons": [r.code for r in decision.reasons]}
            if decision.token:  # an ALLOW
                data["decision"]["decision_token"] = decision.token
        return data

    # ------------------------------------------------------------------ reading
    def list(self, request: mfa_pb2.ListReviewsRequest) -> mfa_pb2.ListReviewsResponse:
        tenant = identifier(request.tenant_id, "tenant_id")
        status = request.status or "pending"
        if status not in STATUSES:
            raise errors.invalid_argument(f"status must be one of {', '.join(STATUSES)}", status="unknown status")
        if request.page_size < 0 or request.page_size > MAX_PAGE:
            raise errors.invalid_argument(f"page_size must be 0..{MAX_PAGE}", page_size="out of range")
        self.expire_due(tenant)  # an overdue case is no longer pending, swept or not
        size = request.page_size or 20
        rows = self.store.reviews.list(tenant, status, size + 1, _after(request.page_token))
        more = len(rows) > size
        rows = rows[:size]
        return mfa_pb2.ListReviewsResponse(reviews=[self.proto(r) for r in rows],
                                           next_page_token=_page_token(rows[-1]) if more else "")

    def tenant_of(self, review_id: str) -> str | None:
        """For the server's tenant check: the review's tenant, None for no such review."""
        rec = self.store.reviews.get(review_id) if review_id else None
        return rec.tenant_id if rec is not None else None

    def get(self, review_id: str) -> ReviewRecord:
        rec = self.store.reviews.get(identifier(review_id, "review_id"))
        if rec is None:
            raise errors.not_found("no such review", "REVIEW_NOT_FOUND")
        return self._settle_overdue(rec)

    def case(self, review_id: str) -> tuple[mfa_pb2.GetReviewResponse, DecisionState | None]:
        """GetReview without its decision (the orchestrator renders that), and the session's decision."""
        rec = self.get(review_id)
        out = mfa_pb2.GetReviewResponse(review=self.proto(rec), note=rec.note)
        found = self.store.auth_sessions.get(rec.session_id)
        if found is None:
            return out, None
        st = SessionState.from_json(dict(found.state))
        out.channel, out.policy_version, out.payee_hash = st.channel, st.policy_version, st.payee or ""
        if st.amount:
            out.amount.CopyFrom(mfa_pb2.Money(currency=st.amount[0], amount_minor=st.amount[1]))
        out.risk.CopyFrom(mfa_pb2.RiskAssessment(level=f"RISK_LEVEL_{st.risk.level.upper()}",
                                                 score=st.risk.score, reasons=to_protos(st.risk.reasons)))
        out.factors.extend(factor_result(o) for o in st.factors)
        out.device_state, out.device_id = st.device.state, st.device.device_id or ""
        out.country = st.place[0] if st.place else ""
        out.degraded.extend(factor_type(m) for m in st.plan.degraded)
        out.session_started_at.CopyFrom(timestamp(found.created_at))
        return out, st.decision

    # ------------------------------------------------------------------ deciding
    def resolve(self, review_id: str, approve: bool, note: str, actor: str) -> tuple[ReviewRecord, DecisionState]:
        """The reviewer's decision. Repeating one's own resolution answers it again (a retry); any
        other resolution of a closed case is FAILED_PRECONDITION naming who closed it how."""
        if len(note) > MAX_NOTE:
            raise errors.invalid_argument(f"note is longer than {MAX_NOTE} characters", note="too long")
        status = "approved" if approve else "rejected"
        rec = self.get(review_id)
        if rec.status == "pending":
            try:
                return self._close(rec, status, actor, note)
            except _Lost:
                rec = self.get(review_id)
        return self._replay(rec, status, actor)

    def _replay(self, rec: ReviewRecord, status: str, actor: str) -> tuple[ReviewRecord, DecisionState]:
        if rec.status == "expired":
            raise errors.failed_precondition(
                f"the review expired unresolved at {self.expires_at(rec).isoformat()}: the session was denied",
                "REVIEW_EXPIRED")
        session = self.sessions.get(rec.session_id)
        decision = session.state.decision if session is not None else None
        if rec.status != status or rec.resolved_by != actor or decision is None or decision.review_id != rec.id:
            raise errors.failed_precondition(f"the review was already {rec.status} by {rec.resolved_by}",
                                             "REVIEW_ALREADY_RESOLVED")
        return rec, decision

    def _close(self, rec: ReviewRecord, status: str, actor: str, note: str) -> tuple[ReviewRecord, DecisionState]:
        now = self.clock()
        session = self.sessions.get(rec.session_id)
        if session is None and status != "expired":
            raise errors.failed_precondition("the review's session no longer exists", "REVIEW_SESSION_GONE")
        try:
            stored = self._decision(session, rec, status, now) if session is not None else None
        except errors.ServiceError:  # the session read after a racing resolution committed: that one won
            current = self.store.reviews.get(rec.id)
            if current is not None and current.status != "pending":
                raise _Lost() from None
            raise

        def change(st: SessionState) -> None:
            if st.decision is not None and st.decision.outcome != "review":
                raise errors.failed_precondition("the session already has a final decision", "SESSION_DECIDED")
            st.decision = stored
        with self.store.db.transaction():  # the case, the session's decision, the audit record, the event
            done = self.store.reviews.resolve(rec.id, status, actor, redact(note), now)
            if done is None:
                raise _Lost()
            if session is not None:
                self.sessions.mutate(session, change, expires_at=max(session.expires_at, now + self.session_ttl))
            self.audit.append("mfa.review_expired" if status == "expired" else "mfa.review_resolved", actor,
                              rec.tenant_id, rec.subject_id, {
                                  "review_id": rec.id, "session_id": rec.session_id, "outcome": status,
                                  "decision": OUTCOME_OF[status], "action": rec.action, "note_chars": len(note),
                                  "signed": bool(stored and stored.token)})
            self.outbox.enqueue(rec.tenant_id, "review.closed", self._event(done, stored), now)
        if stored is not None:  # without a session there is no decision for anyone to read
            metrics.record_decision(stored.outcome, stored.reasons, "review")
        self.notify()
        return done, stored if stored is not None else DecisionState(
            OUTCOME_OF[status], [CLOSING_REASON[status]], 0.0, [], [], "", rec.id, "", now)

    def _decision(self, session: Session, rec: ReviewRecord, status: str, now: datetime) -> DecisionState:
        """The final decision. An approval is an ALLOW token signed like Decide's, with the claims
        ``rid`` and ``rvw``; a DENY is no token (services/mfa/tokens.py says why)."""
        st = session.state
        base = st.decision
        if base is not None and base.outcome != "review":
            raise errors.failed_precondition("the session already has a final decision", "SESSION_DECIDED")
        if base is None:  # a case opened without a stored REVIEW decision: the evidence as it stands
            d = decide(st.plan, st.factors)
            total, amr, acr = d.total, list(d.amr), d.acr
        else:
            total, amr, acr = base.total, list(base.amr), base.acr
        outcome = OUTCOME_OF[status]
        if outcome != "allow":
            amr, acr = [], ""
        reasons = (CLOSING_REASON[status],)
        token = self.sign(session, Decision(outcome, reasons, total, (), tuple(amr), acr), now,
                          {"rid": rec.id, "rvw": status})[0] if outcome == "allow" else ""
        return DecisionState(outcome, list(reasons), total, [], amr, acr, rec.id, token, now)

    # ------------------------------------------------------------------ expiry
    def _settle_overdue(self, rec: ReviewRecord) -> ReviewRecord:
        """The case as it stands now: a pending one past its time is expired first (lazily)."""
        if rec.status != "pending" or self.clock() < self.expires_at(rec):
            return rec
        try:
            return self._close(rec, "expired", SYSTEM, "")[0]
        except _Lost:
            found = self.store.reviews.get(rec.id)
            assert found is not None
            return found

    def settle_session(self, session: Session) -> Session:
        """For Decide: a session whose review is overdue gets its DENY now."""
        decision = session.state.decision
        if decision is None or decision.outcome != "review" or not decision.review_id:
            return session
        rec = self.store.reviews.get(decision.review_id)
        if rec is None or self._settle_overdue(rec).status == "pending":
            return session
        return self.sessions.get(session.id) or session

    def expire_due(self, tenant: str | None = None) -> int:
        """The sweep: every case past its time is denied as expired; returns how many."""
        count = 0
        for rec in self.store.reviews.overdue(self.clock() - self.ttl, MAX_PAGE, tenant):
            try:
                self._close(rec, "expired", SYSTEM, "")
                count += 1
            except (_Lost, errors.ServiceError) as exc:  # resolved meanwhile, or the session decided otherwise
                log.info("review not expired", extra={"review_id": rec.id, "why": type(exc).__name__})
        return count
