"""The MFA orchestrator: authentication sessions from start to a signed decision.

Each RPC handler of server.py calls one method here. Requests are checked completely before
anything is stored; session state changes by compare-and-swap (sessions.py); every significant
step leaves an audit record without personal data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import errors
from services.common.api.v1 import common_pb2, face_pb2, mfa_pb2, voice_pb2
from services.common.runtime import Runtime
from services.common.storage import AlreadyExistsError, AuthSessionRecord, new_id
from services.common.storage.mfa_records import SubjectSignalRecord
from services.common.subjects import actor, timestamp
from services.common.validation import identifier, subject_ref

from . import devices, requests
from .clients import BiometricClient, ServiceUnavailable, open_clients
from .factors import BY_EVIDENCE, FACTORS, FactorContext
from .fusion import Decision, FactorOutcome, Plan, decide, make_plan
from .keys import derive, keyed_hash
from .lockout import Lockouts
from .otp import OtpService
from .policy import Policy, PolicyStore
from .reasons import Reason, to_protos
from .registry import DeviceRegistry
from .reviews import ReviewQueue, to_proto as review_proto
from .risk import Place, RiskEngine, RiskSignals
from .sessions import Sessions
from .sms import SmsGateway, open_gateway
from .tokens import SigningKeys, TokenIssuer

OUTCOMES = {"allow": mfa_pb2.OUTCOME_ALLOW, "step_up": mfa_pb2.OUTCOME_STEP_UP,
            "deny": mfa_pb2.OUTCOME_DENY, "review": mfa_pb2.OUTCOME_REVIEW}
LEVELS = {"low": mfa_pb2.RISK_LEVEL_LOW, "medium": mfa_pb2.RISK_LEVEL_MEDIUM,
          "high": mfa_pb2.RISK_LEVEL_HIGH, "critical": mfa_pb2.RISK_LEVEL_CRITICAL}
FACTOR_ENUMS = {"face": mfa_pb2.FACTOR_TYPE_FACE, "voice": mfa_pb2.FACTOR_TYPE_VOICE,
                "sms_otp": mfa_pb2.FACTOR_TYPE_SMS_OTP, "device": mfa_pb2.FACTOR_TYPE_DEVICE}
MODALITIES = {common_pb2.MODALITY_FACE: "face", common_pb2.MODALITY_VOICE: "voice"}
FINAL = ("allow", "deny", "review")


def _ts(dt: datetime) -> Timestamp:
    return timestamp(dt)


def _sets(sets) -> list[mfa_pb2.FactorSet]:
    return [mfa_pb2.FactorSet(factors=[FACTOR_ENUMS[f] for f in s]) for s in sets]


def budget_of(grpc_context) -> float | None:
    """What downstream calls may spend: the RPC's deadline (the server caps it) less a margin to
    answer in."""
    from services.common import context

    left = context.time_left(-1.0) if context.deadline.get() is not None else (
        grpc_context.time_remaining() if grpc_context is not None else None)
    return None if left is None or left < 0 else max(0.0, left - 0.2)


class Orchestrator:
    def __init__(self, rt: Runtime, clients: dict[str, BiometricClient] | None = None,
                 gateway: SmsGateway | None = None, clock: Callable[[], datetime] | None = None) -> None:
        cfg = rt.settings.mfa
        self.rt = rt
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.policies = PolicyStore(cfg.default_policy, cfg.policy_dir or rt.settings.data_dir / "policies",
                                    cfg.policy_check_s)
        self.clients = clients if clients is not None else open_clients(rt.settings)
        self.gateway = gateway or open_gateway(rt.settings)
        self.otp = OtpService(rt, self.gateway)
        self.sessions = Sessions(rt.storage)
        self.lockouts = Lockouts(rt.storage, rt.audit)
        self.reviews = ReviewQueue(rt.storage, rt.audit)
        self.signing = SigningKeys.from_settings(rt.settings, clock=lambda: self.clock().timestamp())
        self.tokens = TokenIssuer(self.signing, cfg.issuer, cfg.token_ttl_s)
        master = rt.keyring.pseudonym_key()
        self._device_key = derive(master, "device-fingerprint")
        self._idem_key = derive(master, "idempotency")
        self._engines: dict[int, tuple[Policy, RiskEngine]] = {}
        self.registry = DeviceRegistry(rt, self.sessions, self.policies, self._device_key, self.clock)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    def _engine(self, policy: Policy) -> RiskEngine:
        hit = self._engines.get(id(policy))
        if hit is None or hit[0] is not policy:
            if len(self._engines) > 64:
                self._engines.clear()
            hit = self._engines[id(policy)] = (policy, RiskEngine(policy))
        return hit[1]

    def _policy_of(self, rec: AuthSessionRecord) -> Policy:
        return self.policies.get(rec.tenant_id)

    # ------------------------------------------------------------------ start
    def start(self, req: mfa_pb2.StartAuthenticationRequest) -> mfa_pb2.StartAuthenticationResponse:
        now = self.clock()
        tenant, subject = subject_ref(req.subject)
        policy = self.policies.get(tenant)
        channel = requests.channel(req.channel)
        action = requests.action(req.action, list(policy.actions))
        rule = policy.actions[action]
        amount = requests.amount(req, needs=bool(rule.amount_bands))
        signals = requests.context_signals(req.context, now)
        if devices.is_absent(req.device):
            if channel in ("app", "web"):
                raise errors.invalid_argument(f"device is required on the {channel} channel", device="required")
            device = None
        else:
            device = devices.canonical(req.device, self._device_key, tenant)
        session_id = "ses_" + new_id()
        request_hash = None
        if req.idempotency_key:
            key = identifier(req.idempotency_key, "idempotency_key")
            session_id = "ses_" + keyed_hash(self._idem_key, tenant, subject, key)[:32]
            request_hash = keyed_hash(self._idem_key, req.SerializeToString(deterministic=True).hex())
            existing = self.rt.storage.auth_sessions.get(session_id)
            if existing is not None:
                return self._replay_start(existing, request_hash)

        fp = device.fingerprint if device else ""
        self.lockouts.check(tenant, subject, fp, policy.lockout, now)
        lock_state = self.lockouts.subject(tenant, subject, policy.lockout, now)
        bound = self.rt.storage.devices.list_for_subject(tenant, subject)
        if device is not None:
            state, matched = devices.match(device, bound, policy.factors.device.drift_similarity)
        else:
            state, matched = ("unbound" if not bound else "new"), None
        pseudonym = self.rt.pseudonymize(tenant, subject)
        vel = policy.risk.rules.velocity
        _, count = self.rt.storage.rate_limits.hit(f"mfa:velocity:{pseudonym}", vel.window_s, 1_000_000, now)
        last = self.rt.storage.subject_signals.get(tenant, subject)
        last_place = Place(last.country, last.latitude, last.longitude, last.seen_at) if last else None
        risk = self._engine(policy).assess(RiskSignals(
            device=state if device is not None else "bound",  # no device (IVR, kiosk): no device rule
            failures=round(lock_state.failures),
            sessions_in_window=count, place=signals.place, last_place=last_place,
            conversation_text=signals.conversation_text, amount=amount), rule.amount_bands)
        unavailable = {m for m, c in self.clients.items() if not c.available}
        plan = make_plan(policy, action, channel, risk, device_usable=matched is not None, unavailable=unavailable)
        nonce = new_id() + new_id()
        expires = now + timedelta(seconds=self.rt.settings.mfa.session_ttl_s)
        st: dict[str, Any] = {
            "channel": channel, "action": action, "amount": list(amount) if amount else None,
            "device": {"fp": fp, "state": state if device else "absent",
                       "device_id": matched.id if matched else None},
            "nonce": nonce, "policy_version": policy.version,
            "risk": {"score": risk.score, "level": risk.level, "reasons": [r.to_json() for r in risk.reasons]},
            "plan": plan.to_json(), "factors": [], "challenges": {}, "otp_sent_at": None,
            "place": ([signals.place.country, signals.place.latitude, signals.place.longitude]
                      if signals.place else None),
            "decision": None, "request_hash": request_hash,
        }
        try:
            with self.rt.storage.transaction():  # the session and its audit record, or neither
                rec = self.rt.storage.auth_sessions.create(AuthSessionRecord(tenant, subject, st, expires,
                                                                             id=session_id, created_at=now))
                self.rt.audit.append("mfa.session_started", actor(), tenant, subject, {
                    "session_id": rec.id, "action": action, "channel": channel, "risk_level": risk.level,
                    "risk_score": round(risk.score, 1), "risk_reasons": [r.code for r in risk.reasons],
                    "device_state": st["device"]["state"], "policy_version": policy.version,
                    "degraded": sorted(unavailable), "fraud_phrases": len(risk.fraud_phrases)})
        except AlreadyExistsError:  # the same idempotency key, concurrently
            existing = self.rt.storage.auth_sessions.get(session_id)
            assert existing is not None
            return self._replay_start(existing, request_hash)
        return self._start_response(rec)

    def _replay_start(self, rec: AuthSessionRecord, request_hash: str | None) -> mfa_pb2.StartAuthenticationResponse:
        if rec.state.get("request_hash") != request_hash:
            raise errors.already_exists("idempotency_key was used for a different request", "IDEMPOTENCY_KEY_REUSED")
        self.sessions.load(rec.id, self.clock())
        return self._start_response(rec)

    def _start_response(self, rec: AuthSessionRecord) -> mfa_pb2.StartAuthenticationResponse:
        st = rec.state
        risk = st["risk"]
        return mfa_pb2.StartAuthenticationResponse(
            session_id=rec.id, nonce=st["nonce"], expires_at=_ts(rec.expires_at),
            risk=mfa_pb2.RiskAssessment(level=LEVELS[risk["level"]], score=risk["score"],
                                        reasons=to_protos(Reason.from_json(r) for r in risk["reasons"])),
            acceptable=_sets(Plan.from_json(st["plan"]).acceptable()),
            device_bound=st["device"]["device_id"] is not None)

    # ------------------------------------------------------------------ challenges
    def start_challenge(self, req: mfa_pb2.StartBiometricChallengeRequest, budget: float | None = None):
        now = self.clock()
        rec = self.sessions.open(req.session_id, now)
        modality = MODALITIES.get(req.modality)
        if modality is None:
            raise errors.invalid_argument("modality must be face or voice", modality="unspecified")
        plan = Plan.from_json(rec.state["plan"])
        if not any(modality in s for s in plan.acceptable()):
            raise errors.failed_precondition(f"{modality} is not an acceptable factor in this session",
                                             "FACTOR_NOT_ACCEPTABLE")
        subject = common_pb2.SubjectRef(tenant_id=rec.tenant_id, subject_id=rec.subject_id)
        try:
            if modality == "face":
                r = self.clients["face"].call("StartLivenessChallenge",
                                              face_pb2.StartLivenessChallengeRequest(subject=subject), True, budget)
                out = mfa_pb2.StartBiometricChallengeResponse(challenge=r.challenge, moves=r.moves)
            else:
                r = self.clients["voice"].call("StartVoiceChallenge",
                                               voice_pb2.StartVoiceChallengeRequest(subject=subject), True, budget)
                out = mfa_pb2.StartBiometricChallengeResponse(challenge=r.challenge, digits=r.digits)
        except ServiceUnavailable as exc:
            self._degrade(rec, modality)
            raise errors.unavailable(f"{exc}; the session continues in degraded mode",
                                     f"{modality.upper()}_SERVICE_UNAVAILABLE") from None

        def change(st):
            st["challenges"].setdefault(modality, []).append(out.challenge.nonce)
        self.sessions.mutate(rec, change)
        return out

    def _degrade(self, rec: AuthSessionRecord, modality: str) -> AuthSessionRecord:
        policy = self._policy_of(rec)

        def change(st):
            usable = st["device"]["device_id"] is not None
            st["plan"] = Plan.from_json(st["plan"]).degrade(modality, policy, usable).to_json()
        return self.sessions.mutate(rec, change)

    # ------------------------------------------------------------------ factors
    def submit(self, req: mfa_pb2.SubmitFactorRequest, budget: float | None = None) -> mfa_pb2.SubmitFactorResponse:
        now = self.clock()
        rec = self.sessions.open(req.session_id, now)
        which = req.WhichOneof("evidence")
        if which is None:
            raise errors.invalid_argument("one of face, voice, otp or device evidence is required", evidence="missing")
        name = BY_EVIDENCE[which]
        policy = self._policy_of(rec)
        plan = Plan.from_json(rec.state["plan"])
        if not policy.factors.enabled(name) or not any(name in s for s in plan.acceptable()):
            raise errors.failed_precondition(f"{name} is not an acceptable factor in this session",
                                             "FACTOR_NOT_ACCEPTABLE")
        fp = rec.state["device"]["fp"]
        self.lockouts.check(rec.tenant_id, rec.subject_id, fp, policy.lockout, now)
        ctx = FactorContext(self.rt, policy, rec.tenant_id, rec.subject_id, rec.id, rec.state, now,
                            self.clients, self.otp, budget)
        outcome = FACTORS[name].verify(ctx, getattr(req, which))

        def change(st):
            st["factors"].append(outcome.to_json())
            if outcome.unavailable:
                usable = st["device"]["device_id"] is not None
                st["plan"] = Plan.from_json(st["plan"]).degrade(name, policy, usable).to_json()
        with self.rt.storage.transaction():  # counter, session and audit record together
            left = self.lockouts.subject(rec.tenant_id, rec.subject_id, policy.lockout, now).attempts_left
            if outcome.counts_as_failure:
                left = self.lockouts.failure(rec.tenant_id, rec.subject_id, fp, policy.lockout, outcome.liveness,
                                             actor(), now).attempts_left
            rec = self.sessions.mutate(rec, change)
            self.rt.audit.append("mfa.factor", actor(), rec.tenant_id, rec.subject_id, {
                "session_id": rec.id, "factor": name, "passed": outcome.passed, "veto": outcome.veto,
                "llr": round(outcome.llr, 3), "unavailable": outcome.unavailable,
                "reasons": [r.code for r in outcome.reasons]})
        if "otp_attempts_left" in ctx.notes:
            left = min(left, ctx.notes["otp_attempts_left"])
        d = decide(Plan.from_json(rec.state["plan"]), self._outcomes(rec))
        still = d.still_needed if d.outcome == "step_up" else ()
        return mfa_pb2.SubmitFactorResponse(
            result=mfa_pb2.FactorResult(factor=FACTOR_ENUMS[name], passed=outcome.passed, veto=outcome.veto,
                                        llr=outcome.llr, reasons=to_protos(outcome.reasons)),
            still_acceptable=_sets(still), attempts_left=max(0, left))

    @staticmethod
    def _outcomes(rec: AuthSessionRecord) -> list[FactorOutcome]:
        return [FactorOutcome.from_json(f) for f in rec.state["factors"]]

    # ------------------------------------------------------------------ OTP
    def send_otp(self, req: mfa_pb2.SendOtpRequest) -> mfa_pb2.SendOtpResponse:
        now = self.clock()
        rec = self.sessions.open(req.session_id, now)
        policy = self._policy_of(rec)
        cfg = policy.factors.sms_otp
        if not cfg.enabled or not any("sms_otp" in s for s in Plan.from_json(rec.state["plan"]).acceptable()):
            raise errors.failed_precondition("SMS OTP is not an acceptable factor in this session",
                                             "FACTOR_NOT_ACCEPTABLE")
        self.lockouts.check(rec.tenant_id, rec.subject_id, rec.state["device"]["fp"], policy.lockout, now)
        previous = rec.state.get("otp_sent_at")

        def claim(st):  # the cool-down is checked and claimed in one compare-and-swap
            last = st.get("otp_sent_at")
            wait = cfg.resend_cooldown_s - (now - datetime.fromisoformat(last)).total_seconds() if last else 0
            if wait > 0:
                raise errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          f"an OTP was sent moments ago; ask again in {math.ceil(wait)} s",
                                          "OTP_COOLDOWN", metadata={"retry_after_s": str(math.ceil(wait))})
            st["otp_sent_at"] = now.isoformat()
        rec = self.sessions.mutate(rec, claim)
        try:
            sent = self.otp.send(cfg, rec.tenant_id, rec.subject_id, rec.id, now)
        except errors.ServiceError:
            def undo(st):
                st["otp_sent_at"] = previous
            self.sessions.mutate(rec, undo)
            raise
        self.rt.audit.append("mfa.otp_sent", actor(), rec.tenant_id, rec.subject_id,
                             {"session_id": rec.id, "valid_s": cfg.ttl_s, "digits": cfg.digits})
        return mfa_pb2.SendOtpResponse(masked_phone=sent.masked_phone, expires_at=_ts(sent.expires_at),
                                       resend_after=_ts(sent.resend_after))

    # ------------------------------------------------------------------ decision
    def decide(self, req: mfa_pb2.DecideRequest) -> mfa_pb2.DecideResponse:
        now = self.clock()
        rec = self.sessions.load(req.session_id, now)
        if rec.state.get("decision"):
            return self._decision_response(rec.state["decision"])
        policy = self._policy_of(rec)
        locked = self.lockouts.subject(rec.tenant_id, rec.subject_id, policy.lockout, now).locked
        d = decide(Plan.from_json(rec.state["plan"]), self._outcomes(rec), locked)
        review_id = "rev_" + new_id() if d.outcome == "review" else ""
        token, exp = self._sign(rec, d, review_id, now)
        stored = {"outcome": d.outcome, "reasons": [r.to_json() for r in d.reasons], "total": d.total,
                  "still_needed": [list(s) for s in d.still_needed], "amr": list(d.amr), "acr": d.acr,
                  "review_id": review_id, "token": token, "at": now.isoformat()}
        if d.outcome not in FINAL:
            return self._decision_response(stored)

        def change(st):
            if st.get("decision"):
                raise _AlreadyDecided(st["decision"])
            st["decision"] = stored
        try:
            with self.rt.storage.transaction():  # the decision and everything it implies, or nothing
                rec = self.sessions.mutate(rec, change)
                if review_id:
                    self.reviews.open(rec.tenant_id, rec.subject_id, rec.id, rec.state["action"], d.reasons, review_id)
                if d.outcome == "allow":
                    self.lockouts.success(rec.tenant_id, rec.subject_id, rec.state["device"]["fp"])
                    place = rec.state.get("place")
                    if place and place[0]:
                        self.rt.storage.subject_signals.put(SubjectSignalRecord(
                            rec.tenant_id, rec.subject_id, place[0], place[1], place[2], now))
                self.rt.audit.append("mfa.decision", actor(), rec.tenant_id, rec.subject_id, {
                    "session_id": rec.id, "outcome": d.outcome, "reasons": [r.code for r in d.reasons],
                    "total_llr": d.total, "acr": d.acr, "amr": list(d.amr), "review_id": review_id,
                    "action": rec.state["action"], "policy_version": rec.state["policy_version"]})
        except _AlreadyDecided as done:  # a concurrent Decide got there first
            return self._decision_response(done.decision)
        return self._decision_response(stored)

    def _sign(self, rec: AuthSessionRecord, d: Decision, review_id: str, now: datetime) -> tuple[str, float]:
        claims: dict[str, Any] = {
            "aud": rec.tenant_id, "sub": self.rt.pseudonymize(rec.tenant_id, rec.subject_id), "sid": rec.id,
            "act": rec.state["action"], "decision": d.outcome, "amr": list(d.amr), "acr": d.acr,
            "pol": rec.state["policy_version"]}
        if rec.state.get("amount"):
            claims["amt"] = {"cur": rec.state["amount"][0], "minor": rec.state["amount"][1]}
        if review_id:
            claims["rid"] = review_id
        return self.tokens.issue(claims, now.timestamp())

    @staticmethod
    def _decision_response(stored: dict[str, Any]) -> mfa_pb2.DecideResponse:
        return mfa_pb2.DecideResponse(
            outcome=OUTCOMES[stored["outcome"]], reasons=to_protos(Reason.from_json(r) for r in stored["reasons"]),
            still_needed=_sets(stored["still_needed"]), token=stored["token"], acr=stored["acr"],
            amr=stored["amr"], review_id=stored["review_id"], total_llr=stored["total"])

    # ------------------------------------------------------------------ devices
    def register_device(self, req: mfa_pb2.RegisterDeviceRequest) -> mfa_pb2.RegisterDeviceResponse:
        return self.registry.register(req)

    def list_devices(self, req: mfa_pb2.ListDevicesRequest) -> mfa_pb2.ListDevicesResponse:
        return self.registry.list(req)

    def revoke_device(self, req: mfa_pb2.RevokeDeviceRequest) -> mfa_pb2.RevokeDeviceResponse:
        return self.registry.revoke(req)

    # ------------------------------------------------------------------ administration
    def unlock(self, req: mfa_pb2.UnlockSubjectRequest) -> mfa_pb2.UnlockSubjectResponse:
        tenant, subject = subject_ref(req.subject)
        reason = requests.label(req.reason, "reason") if req.reason else "unspecified"
        was_locked = self.lockouts.unlock(tenant, subject)
        self.rt.audit.append("mfa.subject_unlocked", actor(), tenant, subject,
                             {"reason": reason, "had_failures": was_locked})
        return mfa_pb2.UnlockSubjectResponse()

    def list_reviews(self, req: mfa_pb2.ListReviewsRequest) -> mfa_pb2.ListReviewsResponse:
        return self.reviews.list(req)

    def resolve_review(self, req: mfa_pb2.ResolveReviewRequest) -> mfa_pb2.ResolveReviewResponse:
        from services.common import context

        rec = self.reviews.get(req.review_id)
        principal = context.principal.get()
        if principal is not None and not principal.may_act_for(rec.tenant_id):
            raise errors.permission_denied(f"caller '{principal.name}' may not act for this review's tenant",
                                           "TENANT_NOT_ALLOWED")
        return mfa_pb2.ResolveReviewResponse(review=review_proto(self.reviews.resolve(rec, req.approve, req.note, actor())))

    def jwks(self) -> mfa_pb2.GetSigningKeysResponse:
        import json

        return mfa_pb2.GetSigningKeysResponse(jwks_json=json.dumps(self.signing.jwks()))


class _AlreadyDecided(Exception):
    def __init__(self, decision: dict[str, Any]) -> None:
        super().__init__("decided")
        self.decision = decision

