"""Push confirmation: the subject's bound app shows what the session is for (action, amount, payee,
where and on what it started) and the customer approves or denies it; the app signs its answer,
with the number the bank's screen showed (number matching against push fatigue), with the device's
bound key or passkey over exactly those bytes (services/mfa/push/confirmation.py).

The confirmation is handed out by services/mfa/push/flow.py (SendPushConfirmation); the answer
arrives through ConfirmTransaction. An answer counts once (settle): a replay is refused before
anything is written, as is one after the confirmation expired. An approval proves possession of
the bound device; a deny is the customer's "not me": the outcome carries ``deny`` and the session
ends DENY (fusion.decide, CUSTOMER_DENIED)."""

from __future__ import annotations

from datetime import datetime

from services.common import errors
from services.common.api.v1 import mfa_pb2
from services.common.validation import identifier

from ..fusion import FactorOutcome
from ..proofs import Proven, Refused, key_proof_shape
from ..push.confirmation import ConfirmationError, parse_answer
from ..reasons import Reason
from ..state import SessionState
from .base import Factor, FactorContext

MESSAGES = {
    "PUSH_APPROVED": "the customer approved the transaction on their bound device",
    "PUSH_DENIED": "the customer denied the transaction on their bound device",
}


class PushFactor(Factor):
    name = "push"

    def validate(self, ctx: FactorContext, ev: mfa_pb2.PushAnswer) -> None:
        identifier(ev.confirmation_id, "answer.confirmation_id")
        identifier(ev.device_id, "answer.device_id")
        key_proof_shape(ev, "answer")
        try:
            answer = parse_answer(ev.context)
        except ConfirmationError as exc:
            raise errors.invalid_argument(f"answer.context: {exc}", answer__context="not a version-1 confirmation") from None
        if answer.confirmation.confirmation_id != ev.confirmation_id:
            raise errors.invalid_argument("answer.confirmation_id differs from the signed context's",
                                          answer__confirmation_id="not the signed one")
        push = ctx.state.push
        if push is None:
            raise errors.failed_precondition("no push confirmation is out in this session; call SendPushConfirmation",
                                             "PUSH_NOT_SENT")
        if push["cid"] == ev.confirmation_id and push.get("answered"):
            raise errors.failed_precondition("this confirmation was answered already; send a new one",
                                             "PUSH_ALREADY_ANSWERED")
        if push["cid"] == ev.confirmation_id and ctx.now >= datetime.fromisoformat(push["exp"]):
            raise errors.failed_precondition("the confirmation expired; send a new one", "PUSH_EXPIRED")

    def check(self, ctx: FactorContext, ev: mfa_pb2.PushAnswer) -> FactorOutcome:
        assert ctx.proofs is not None and ctx.state.push is not None
        push, st = ctx.state.push, ctx.state
        answer = parse_answer(ev.context)
        c = answer.confirmation
        ctx.notes["audit"] = {"confirmation_id": ev.confirmation_id, "answer": answer.answer}
        try:
            if (c.session_id, c.nonce, c.tenant) != (ctx.session_id, st.nonce, ctx.tenant):
                raise Refused("PUSH_FOR_OTHER_SESSION", "the signed confirmation is of another session")
            if c.confirmation_id != push["cid"]:
                raise Refused("PUSH_NOT_CURRENT", "the signed confirmation is not the one out in this session")
            if ev.device_id != push["device_id"]:
                raise Refused("PUSH_WRONG_DEVICE", "the confirmation was sent to another bound device")
            rec = ctx.proofs.bound_device(ctx, ev.device_id, "PUSH_DEVICE_NOT_BOUND")
            kind = ctx.proofs.verify(ctx, rec, ev.signature, ev.webauthn if ev.HasField("webauthn") else None,
                                     ev.context, "PUSH")
        except Refused as refused:
            return FactorOutcome(self.name, False, reasons=(refused.reason,))
        proven = Proven(kind, f"device:{rec.id}", device_id=rec.id)
        ctx.notes["bound"] = proven
        payee = ctx.proofs.payee_hash(ctx.tenant, c.payee) if c.payee is not None else None
        if (c.action, c.amount, payee) != (st.action, st.amount, st.payee) \
                or (c.shown.to_json(), c.expires) != (push["shown"], push["exp"]):
            return FactorOutcome(self.name, False, veto=True, binding=kind, authenticator=proven.authenticator,
                                 reasons=(Reason("PUSH_CONTEXT_MISMATCH", "the device confirmed another action, "
                                                 "amount, payee or context than this session's"),))
        ctx.store.devices.touch(ctx.tenant, rec.id, ctx.now)
        if answer.answer == "deny":
            return FactorOutcome(self.name, False, deny=True, binding=kind, authenticator=proven.authenticator,
                                 reasons=(Reason("PUSH_DENIED", MESSAGES["PUSH_DENIED"]),))
        if answer.number != push["number"]:
            return FactorOutcome(self.name, False, binding=kind, authenticator=proven.authenticator,
                                 reasons=(Reason("PUSH_NUMBER_MISMATCH",
                                                 "the number entered is not the one the screen showed"),))
        return FactorOutcome(self.name, True, ctx.policy.factors.push.evidence, binding=kind,
                             authenticator=proven.authenticator, reasons=(Reason("PUSH_APPROVED", MESSAGES["PUSH_APPROVED"]),))

    def settle(self, ctx: FactorContext, state: SessionState, ev: mfa_pb2.PushAnswer) -> None:
        push = state.push
        if push is not None and push["cid"] == ev.confirmation_id:
            if push.get("answered"):
                raise errors.failed_precondition("this confirmation was answered already; send a new one",
                                                 "PUSH_ALREADY_ANSWERED")
            push["answered"] = True
            push.pop("sealed", None)  # what it showed is not kept past its answer
