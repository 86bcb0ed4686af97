"""The push confirmation round trip of a session (issue 17).

SendPushConfirmation: the session must accept the push factor; the confirmation (a random id, the
number for the bank's screen, the facts shown, an expiry within the policy's ttl, at most 2 minutes)
is kept in the session with its audit record, then handed to the gateway for the subject's bound
device with a push token (the most recently seen, never a flagged one). The push carries only ids:
what the confirmation shows (action, amount, payee, ...) stays with the MFA, sealed in the session
(the runtime's envelope encryption, bound to tenant, subject and confirmation) until it is answered.

GetPushConfirmation: the app the push went to reads those fields, proving possession of that
device's bound key (or passkey) over the fetch context (confirmation.fetch_context), checked like a
device proof (services/mfa/proofs.py). Another device or subject, or a bad signature, is refused
(PERMISSION_DENIED) before anything about the confirmation is told; then an answered, expired or
replaced one (FAILED_PRECONDITION). Audited, refusals of the proof included. No such device, or a
gateway that fails, and the session falls back to the policy's sets (``factors.push.fallback``, with
an IVR call-back for a voice factor when ``ivr_callback``), audited; never an ALLOW without a factor.

ConfirmTransaction: the app's signed answer, evaluated as the push factor (services/mfa/factors/push.py)
through the orchestrator's one submission path (lockout, compare-and-swap, audit). A deny flags the
subject (its signals) and the session's device when it is a bound one, audited in the same
transaction, and ends the session with its DENY decision. Every audit record of the round trip
carries the request id of the call that started the session.
"""

from __future__ import annotations

import base64
import logging
import secrets
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import grpc

from services.common import errors
from services.common.context import Principal
from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.storage import new_id
from services.common.subjects import timestamp
from services.common.validation import identifier, subject_ref

from ..binding import canonical_json
from ..factors import FACTORS
from ..proofs import Refused, key_proof_shape
from ..render import factor_sets
from ..sessions import Session, require_open
from ..state import SessionState
from .base import PushError
from .confirmation import Confirmation, SealedFields, Shown, fetch_context

if TYPE_CHECKING:
    from ..service import Orchestrator

log = logging.getLogger("biogate.mfa.push")
MAX_PUSH_TOKEN = 4096


class PushConfirmations:
    def __init__(self, orch: Orchestrator) -> None:
        self.o = orch

    # ------------------------------------------------------------------ send
    def send(self, req: mfa_pb2.SendPushConfirmationRequest,
             caller: Principal) -> mfa_pb2.SendPushConfirmationResponse:
        o = self.o
        now = o.clock()
        session = o.sessions.open(req.session_id, now, caller)
        policy = o.policies.get(session.tenant_id)
        o.require_acceptable(policy, session, "push")
        st, tenant, subject = session.state, session.tenant_id, session.subject_id
        shown_payee = o.payee_shown(req, session)
        o.lockouts.check(tenant, subject, st.device.fp, policy.lockout, now, st.device_usable)
        cfg = policy.factors.push
        if st.push_sends >= cfg.max_sends:
            raise errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"{cfg.max_sends} confirmations were sent in this session; start a new one",
                                      "PUSH_LIMIT")
        target = self._device(tenant, subject)
        if target is None:
            return self._fall_back(session, "NO_PUSH_DEVICE", "no bound device of the subject can receive a push", caller)
        expires = now + timedelta(seconds=cfg.ttl_s)
        conf = Confirmation(
            "pc_" + new_id(), session.id, st.nonce, tenant, st.action, st.amount, shown_payee,
            Shown(st.channel, st.place[0] if st.place and st.place[0] else None, st.device.state),
            expires.isoformat())
        number = f"{secrets.randbelow(10 ** cfg.number_digits):0{cfg.number_digits}d}"
        sealed = o.rt.crypto.seal(SealedFields(tenant, subject, conf.confirmation_id), canonical_json(conf.fields()))
        out = {"cid": conf.confirmation_id, "number": number, "device_id": target.id, "exp": conf.expires,
               "shown": conf.shown.to_json(), "sealed": base64.b64encode(sealed).decode()}

        def record(s: SessionState) -> None:
            require_open(s)
            if s.push_sends >= cfg.max_sends:
                raise errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          f"{cfg.max_sends} confirmations were sent in this session", "PUSH_LIMIT")
            s.push, s.push_sends = dict(out), s.push_sends + 1
        with o.rt.storage.transaction():  # kept before it leaves: an answer always finds it
            session = o.sessions.mutate(session, record)
            o.rt.audit.append("mfa.push_sent", caller.name, tenant, subject, {
                "session_id": session.id, "confirmation_id": conf.confirmation_id, "device_id": target.id,
                "expires_at": conf.expires, "request_id": st.request_id or ""})
        assert target.push_token is not None
        try:
            o.push_gateway.send(target.push_token, conf.push_data(st.request_id or ""), cfg.ttl_s,
                                conf.confirmation_id)
        except PushError as exc:
            log.warning("push gateway failed", extra={"session_id": session.id, "request_id": st.request_id,
                                                      "error": str(exc)})
            return self._fall_back(session, "PUSH_UNAVAILABLE", f"the push gateway failed: {exc}", caller)
        return mfa_pb2.SendPushConfirmationResponse(
            sent=True, confirmation_id=conf.confirmation_id, number=number, expires_at=timestamp(expires),
            device_id=target.id)

    def _device(self, tenant: str, subject: str):
        usable = [d for d in self.o.store.devices.list_for_subject(tenant, subject)
                  if d.push_token and d.flagged_at is None and d.public_key]
        return max(usable, key=lambda d: (d.last_seen_at or d.bound_at, d.bound_at), default=None)

    def _fall_back(self, session: Session, code: str, why: str,
                   caller: Principal) -> mfa_pb2.SendPushConfirmationResponse:
        o = self.o
        policy = o.policies.get(session.tenant_id)
        cfg = policy.factors.push
        callback = "ivr" if cfg.ivr_callback and any("voice" in s for s in cfg.fallback) else None

        def change(s: SessionState) -> None:
            require_open(s)  # decided while the push was going out: nothing is left to fall back for
            s.plan = s.plan.fall_back("push", cfg.fallback, policy, s.device_usable)
            s.push = None  # whatever was out never reached the app
            s.callback_channel = callback or s.callback_channel
        with o.rt.storage.transaction():
            session = o.sessions.mutate(session, change)
            o.rt.audit.append("mfa.push_fallback", caller.name, session.tenant_id, session.subject_id, {
                "session_id": session.id, "reason": code, "sets": [list(s) for s in session.state.plan.acceptable()],
                "ivr_callback": bool(callback), "request_id": session.state.request_id or ""})
        return mfa_pb2.SendPushConfirmationResponse(
            sent=False, reason=common_pb2.Reason(code=code, message=why + "; the session falls back"),
            acceptable=factor_sets(session.state.plan.acceptable()), ivr_callback=bool(callback))

    # ------------------------------------------------------------------ the app reads it
    def fetch(self, req: mfa_pb2.GetPushConfirmationRequest, caller: Principal) -> mfa_pb2.GetPushConfirmationResponse:
        o = self.o
        cid = identifier(req.confirmation_id, "confirmation_id")
        device_id = identifier(req.device_id, "device_id")
        key_proof_shape(req, "request")
        now = o.clock()
        session = o.sessions.open(req.session_id, now, caller)
        st, tenant, subject = session.state, session.tenant_id, session.subject_id
        push = st.push
        if push is None:
            raise errors.failed_precondition("no push confirmation is out in this session", "PUSH_NOT_SENT")
        if push["cid"] != cid:
            raise errors.failed_precondition("that confirmation is not the one out in this session", "PUSH_NOT_CURRENT")
        ctx = o.factor_context(session, o.policies.get(tenant), now, caller=caller)
        try:
            if device_id != push["device_id"]:
                raise Refused("PUSH_WRONG_DEVICE", "the confirmation was sent to another bound device")
            rec = o.proofs.bound_device(ctx, device_id, "PUSH_DEVICE_NOT_BOUND")
            o.proofs.verify(ctx, rec, req.signature, req.webauthn if req.HasField("webauthn") else None,
                            fetch_context(session.id, cid, device_id), "PUSH")
        except Refused as refused:
            self._audit_fetch(session, cid, device_id, refused.reason.code, caller)
            raise errors.permission_denied(refused.reason.message, refused.reason.code) from None
        if push.get("answered"):
            raise errors.failed_precondition("this confirmation was answered already", "PUSH_ALREADY_ANSWERED")
        if "sealed" not in push:  # sent by a version that pushed the fields themselves
            raise errors.failed_precondition("this confirmation's fields went with its push", "PUSH_NOT_CURRENT")
        if now >= datetime.fromisoformat(push["exp"]):
            raise errors.failed_precondition("the confirmation expired; the bank may send a new one", "PUSH_EXPIRED")
        fields = o.rt.crypto.open(SealedFields(tenant, subject, cid), base64.b64decode(push["sealed"]))
        self._audit_fetch(session, cid, device_id, "", caller)
        return mfa_pb2.GetPushConfirmationResponse(fields=fields, expires_at=timestamp(datetime.fromisoformat(push["exp"])))

    def _audit_fetch(self, session: Session, cid: str, device_id: str, refused: str, caller: Principal) -> None:
        self.o.rt.audit.append("mfa.push_fetched", caller.name, session.tenant_id, session.subject_id, {
            "session_id": session.id, "confirmation_id": cid, "device_id": device_id, "refused": refused,
            "request_id": session.state.request_id or ""})

    # ------------------------------------------------------------------ answer
    def confirm(self, req: mfa_pb2.ConfirmTransactionRequest, budget: float | None,
                caller: Principal) -> mfa_pb2.ConfirmTransactionResponse:
        o = self.o
        now = o.clock()
        try:
            session = o.sessions.open(req.session_id, now, caller)
            if not req.HasField("answer"):
                raise errors.invalid_argument("answer is required", answer="missing")
            response, outcome, session = o.submit_evidence(session, "push", req.answer, now, budget, caller)
        except errors.ServiceError as exc:
            if exc.reason == "SESSION_DECIDED":
                self._late_deny(req.session_id, req.answer, now, caller)
            raise
        out = mfa_pb2.ConfirmTransactionResponse(result=response.result, still_acceptable=response.still_acceptable,
                                                 attempts_left=response.attempts_left)
        if outcome.deny:
            self._flag(session, req.answer.device_id, now, caller)
            out.decision.CopyFrom(o.decide(mfa_pb2.DecideRequest(session_id=session.id), caller=caller))
        return out

    def _late_deny(self, session_id: str, answer: mfa_pb2.PushAnswer, now: datetime, caller: Principal) -> None:
        """A customer's "not me" for the confirmation still out when the session was decided on
        other factors: too late to change the decision, but the fraud signal is kept (the caller is
        refused SESSION_DECIDED alike whether or not the answer held, so it reveals nothing). The
        confirmation is marked answered with the flag, in the session's compare-and-swap, so that
        the same answer again (a retry, a replay, a copy raced with it) writes nothing more."""
        o = self.o
        session = o.sessions.load(session_id, now, caller)
        decision = session.state.decision
        factor = FACTORS["push"]
        ctx = o.factor_context(session, o.policies.get(session.tenant_id), now, caller=caller)
        try:
            factor.validate(ctx, answer)  # the confirmation out, unanswered, unexpired; well formed
        except errors.ServiceError:
            return
        if decision is None or not factor.check(ctx, answer).deny:  # signed by the device it went to
            return
        try:
            with o.rt.storage.transaction():  # answered, flagged and audited together
                session = o.sessions.mutate(session, lambda st: factor.settle(ctx, st, answer))
                self._flag(session, answer.device_id, now, caller, after_decision=decision.outcome)
        except errors.ServiceError as exc:
            if exc.reason != "PUSH_ALREADY_ANSWERED":  # a copy got there first: it flagged
                raise

    def _flag(self, session: Session, answering_device: str, now, caller: Principal, after_decision: str = "") -> None:
        o, st = self.o, session.state
        with o.rt.storage.transaction():  # the flags and their audit record together (or the caller's)
            o.store.subject_signals.flag(session.tenant_id, session.subject_id, "PUSH_DENIED", now)
            if st.device.device_id:
                o.store.devices.flag(session.tenant_id, st.device.device_id, now)
            o.rt.audit.append("mfa.fraud_flagged", caller.name, session.tenant_id, session.subject_id, {
                "session_id": session.id, "reason": "PUSH_DENIED", "denied_on": answering_device,
                "session_device": st.device.device_id or "", "session_device_state": st.device.state,
                "session_device_fp": st.device.fp, "channel": st.channel, "request_id": st.request_id or "",
                **({"after_decision": after_decision} if after_decision else {})})

    # ------------------------------------------------------------------ tokens
    def set_token(self, req: mfa_pb2.SetPushTokenRequest, caller: Principal) -> mfa_pb2.SetPushTokenResponse:
        o = self.o
        tenant, subject = subject_ref(req.subject)
        device_id = identifier(req.device_id, "device_id")
        token = req.push_token
        if len(token) > MAX_PUSH_TOKEN or not token.isprintable() or " " in token:
            raise errors.invalid_argument(f"push_token must be up to {MAX_PUSH_TOKEN} printable characters without spaces",
                                          push_token="malformed")
        rec = o.store.devices.get(tenant, device_id)
        if rec is None or rec.subject_id != subject or rec.revoked_at is not None:
            raise errors.not_found("the subject has no bound device with that id", "DEVICE_NOT_FOUND")
        with o.rt.storage.transaction():
            o.store.devices.set_push_token(tenant, device_id, token or None)
            o.rt.audit.append("mfa.push_token_set", caller.name, tenant, subject,
                              {"device_id": device_id, "cleared": not token})
        return mfa_pb2.SetPushTokenResponse()
