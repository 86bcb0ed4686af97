"""The MFA orchestrator: authentication sessions from start to a signed decision.

Each RPC handler of server.py calls one method here. Requests are checked completely before
anything is stored; session state changes by compare-and-swap (sessions.py); every significant
step leaves an audit record without personal data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common import context, errors
from services.common.context import Principal
from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.runtime import Runtime
from services.common.storage import AlreadyExistsError, new_id
from services.common.subjects import timestamp
from services.common.validation import identifier, subject_ref

from . import devices, metrics, requests
from .binding import payee_object
from .clients import BiometricClient, ServiceUnavailable, open_clients
from .factors import BY_EVIDENCE, FACTORS, FactorContext
from .factors.voice import StreamedVoice, held, stream_byte_rate, stream_chunks
from .fusion import Decision, FactorOutcome, decide, make_plan
from .keys import derive, keyed_hash
from .lockout import Lockouts
from .otp import OtpService
from .policy import Policy, PolicyStore
from .proofs import Proofs
from .reasons import Reason, to_protos
from .registry import DeviceRegistry
from .render import factor_result, factor_sets
from .reviews import ReviewQueue
from .risk import Place, RiskEngine, RiskSignals
from .sessions import Session, Sessions, require_open, require_room, terminal_may_serve
from .push import PushGateway, open_push_gateway
from .push.flow import PushConfirmations
from .signals import apply_cooling_off, recent_changes
from .sms import SmsGateway, open_gateway
from .state import DecisionState, DeviceState, RiskState, SessionState
from .storage import SubjectSignalRecord, attach
from .tokens import SigningKeys, TokenIssuer
from .webhooks import WebhookOutbox
from .config import mfa_settings

OUTCOMES = {"allow": mfa_pb2.OUTCOME_ALLOW, "step_up": mfa_pb2.OUTCOME_STEP_UP,
            "deny": mfa_pb2.OUTCOME_DENY, "review": mfa_pb2.OUTCOME_REVIEW}
LEVELS = {"low": mfa_pb2.RISK_LEVEL_LOW, "medium": mfa_pb2.RISK_LEVEL_MEDIUM,
          "high": mfa_pb2.RISK_LEVEL_HIGH, "critical": mfa_pb2.RISK_LEVEL_CRITICAL}
MODALITIES = {common_pb2.MODALITY_FACE: "face", common_pb2.MODALITY_VOICE: "voice"}
FINAL = ("allow", "deny", "review")


def _ts(dt: datetime) -> Timestamp:
    return timestamp(dt)


def budget_of(grpc_context) -> float | None:
    """What downstream calls may spend: the RPC's deadline (the server caps it) less a margin to
    answer in."""
    from services.common import context

    left = context.time_left(-1.0) if context.deadline.get() is not None else (
        grpc_context.time_remaining() if grpc_context is not None else None)
    return None if left is None or left < 0 else max(0.0, left - 0.2)


def velocity_key(pseudonym: str) -> str:
    return f"mfa:velocity:{pseudonym}"


class Orchestrator:
    def __init__(self, rt: Runtime, clients: dict[str, BiometricClient] | None = None,
                 gateway: SmsGateway | None = None, clock: Callable[[], datetime] | None = None,
                 push_gateway: PushGateway | None = None) -> None:
        self.settings = settings = mfa_settings(rt.settings)
        cfg = settings.mfa
        self.rt = rt
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.policies = PolicyStore(cfg.default_policy, cfg.policy_dir or settings.data_dir / "policies",
                                    cfg.policy_check_s)
        self.store = attach(rt.storage)
        self.clients = clients if clients is not None else open_clients(settings)
        self.gateway = gateway or open_gateway(settings)
        self.push_gateway = push_gateway or open_push_gateway(settings)
        self.otp = OtpService(rt, self.store, self.gateway)
        self.sessions = Sessions(self.store)
        self.lockouts = Lockouts(self.store, rt.audit)
        self.outbox = WebhookOutbox(self.store, cfg.reviews.webhook, self.clock)
        self.reviews = ReviewQueue(self.store, rt.audit, self.sessions, self._sign, cfg.reviews, cfg.session_ttl_s,
                                   self.outbox, self.clock)
        self.signing = SigningKeys.from_settings(settings, clock=lambda: self.clock().timestamp(),
                                                 audit=rt.key_audit())
        self.tokens = TokenIssuer(self.signing, cfg.issuer, cfg.token_ttl_s)
        master = rt.keyring.pseudonym_key()
        self._device_key = derive(master, "device-fingerprint")
        self._idem_key = derive(master, "idempotency")
        self.proofs = Proofs(self.store, cfg.webauthn, derive(master, "payee"))
        self._engines: dict[int, tuple[Policy, RiskEngine]] = {}
        self.registry = DeviceRegistry(rt, self.store, self.sessions, self.policies, self._device_key, self.clock,
                                       cfg.webauthn)
        self.push = PushConfirmations(self)

    def rate_limit_keys(self, tenant: str, subject: str) -> list[str]:
        """The rate-limit counters kept under the subject's pseudonym or phone number (erased with it)."""
        return [velocity_key(self.rt.pseudonymize(tenant, subject)), *self.otp.rate_limit_keys(tenant, subject)]

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

    def _policy_of(self, session: Session) -> Policy:
        return self.policies.get(session.tenant_id)

    def factor_context(self, session: Session, policy: Policy, now: datetime, budget: float | None = None, *,
                       caller: Principal) -> FactorContext:
        return FactorContext(self.rt, self.store, policy, session.tenant_id, session.subject_id, session.id,
                             session.state, now, self.clients, self.otp, budget, proofs=self.proofs, caller=caller)

    @staticmethod
    def require_acceptable(policy: Policy, session: Session, name: str) -> None:
        if not policy.factors.enabled(name) or not any(name in s for s in session.state.plan.acceptable()):
            raise errors.failed_precondition(f"{name} is not an acceptable factor in this session",
                                             "FACTOR_NOT_ACCEPTABLE")

    # ------------------------------------------------------------------ start
    def start(self, req: mfa_pb2.StartAuthenticationRequest, *,
              caller: Principal) -> mfa_pb2.StartAuthenticationResponse:
        """``caller``: the RPC's principal, which the servicer passes to every method here that
        opens or touches a session or writes an audit record (context.SYSTEM: an in-process caller,
        e.g. a test or benchmark)."""
        now = self.clock()
        tenant, subject = subject_ref(req.subject)
        policy = self.policies.get(tenant)
        channel = requests.channel(req.channel)
        terminal_may_serve(caller, channel)
        action = requests.action(req.action, list(policy.actions))
        rule = policy.actions[action]
        amount = requests.amount(req, rule.amount_bands.keys())
        payee = requests.payee(req, needs=rule.payee == "required")
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
            existing = self.sessions.get(session_id)
            if existing is not None:
                return self._replay_start(existing, request_hash, caller)

        fp = device.fingerprint if device else ""
        bound = self.store.devices.list_for_subject(tenant, subject)
        if device is not None:
            state, matched = devices.match(device, bound, policy.factors.device.drift_similarity)
        else:
            state, matched = ("unbound" if not bound else "new"), None
        self.lockouts.check(tenant, subject, fp, policy.lockout, now, bound=matched is not None)
        lock_state = self.lockouts.subject(tenant, subject, policy.lockout, now)
        pseudonym = self.rt.pseudonymize(tenant, subject)
        vel = policy.risk.rules.velocity
        _, count = self.rt.storage.rate_limits.hit(velocity_key(pseudonym), vel.window_s, 1_000_000, now)
        last = self.store.subject_signals.get(tenant, subject)
        last_place = Place(last.country, last.latitude, last.longitude, last.seen_at) if last else None
        risk = self._engine(policy).assess(RiskSignals(
            device=state if device is not None else "bound",  # no device (IVR, kiosk): no device rule
            failures=round(lock_state.failures),
            sessions_in_window=count, place=signals.place, last_place=last_place,
            conversation_text=signals.conversation_text, amount=amount), rule.amount_bands)
        risk = apply_cooling_off(policy, action, risk, recent_changes(policy, self.store, tenant, subject, last,
                                                                      matched, now))
        unavailable = {m for m, c in self.clients.items() if not c.available}
        plan = make_plan(policy, action, channel, risk, device_usable=matched is not None, unavailable=unavailable)
        nonce = new_id() + new_id()
        expires = now + timedelta(seconds=self.settings.mfa.session_ttl_s)
        place = (signals.place.country, signals.place.latitude, signals.place.longitude) if signals.place else None
        st = SessionState(
            channel=channel, action=action, amount=amount,
            device=DeviceState(fp, state if device else "absent", matched.id if matched else None),
            nonce=nonce, policy_version=policy.version, risk=RiskState(risk.score, risk.level, list(risk.reasons)),
            plan=plan, place=place, request_hash=request_hash, request_id=context.request_id.get() or None,
            payee=self.proofs.payee_hash(tenant, payee_object(*payee)) if payee else None)
        try:
            with self.rt.storage.transaction():  # the session and its audit record, or neither
                session = self.sessions.create(tenant, subject, st, expires, session_id, now)
                self.rt.audit.append("mfa.session_started", caller.name, tenant, subject, {
                    "session_id": session.id, "action": action, "channel": channel, "risk_level": risk.level,
                    "risk_score": round(risk.score, 1), "risk_reasons": [r.code for r in risk.reasons],
                    "device_state": st.device.state, "policy_version": policy.version,
                    "degraded": sorted(unavailable), "fraud_phrases": len(risk.fraud_phrases),
                    "payee": st.payee})
        except AlreadyExistsError:  # the same idempotency key, concurrently
            existing = self.sessions.get(session_id)
            assert existing is not None
            return self._replay_start(existing, request_hash, caller)
        return self._start_response(session)

    def _replay_start(self, session: Session, request_hash: str | None,
                      caller: Principal) -> mfa_pb2.StartAuthenticationResponse:
        if session.state.request_hash != request_hash:
            raise errors.already_exists("idempotency_key was used for a different request", "IDEMPOTENCY_KEY_REUSED")
        self.sessions.load(session.id, self.clock(), caller)
        return self._start_response(session)

    def _start_response(self, session: Session) -> mfa_pb2.StartAuthenticationResponse:
        st = session.state
        return mfa_pb2.StartAuthenticationResponse(
            session_id=session.id, nonce=st.nonce, expires_at=_ts(session.expires_at),
            risk=mfa_pb2.RiskAssessment(level=LEVELS[st.risk.level], score=st.risk.score,
                                        reasons=to_protos(st.risk.reasons)),
            acceptable=factor_sets(st.plan.acceptable()), device_bound=st.device_usable)

    # ------------------------------------------------------------------ challenges
    def challenge(self, name: str, session_id: str, budget: float | None = None,
                  shown: mfa_pb2.SendOtpRequest | None = None, *, caller: Principal) -> Any:
        """One path for every factor's challenge (SendOtp; StartBiometricChallenge for face and
        voice): the factor must be acceptable in the session, the subject and device not locked;
        the factor claims what it needs in the session, issues, and the session keeps the nonce.
        ``shown``: a request naming the payee the user is shown (checked, then in ctx.notes); it must
        name it when the session has one."""
        now = self.clock()
        session = self.sessions.open(session_id, now, caller)
        policy = self._policy_of(session)
        self.require_acceptable(policy, session, name)
        payee = self.payee_shown(shown, session) if shown is not None else None
        self.lockouts.check(session.tenant_id, session.subject_id, session.state.device.fp, policy.lockout, now,
                            session.state.device_usable)
        factor = FACTORS[name]
        ctx = self.factor_context(session, policy, now, budget, caller=caller)
        if payee is not None:
            ctx.notes["payee"] = payee
        biometric = name in MODALITIES.values()
        limit = policy.session.max_biometric_challenges
        if biometric:
            require_room(len(session.state.challenges.get(name, [])), limit, f"{name} challenges")

        def claim(st: SessionState) -> None:
            require_open(st)  # decided since it was loaded: nothing may be sent for it
            factor.claim(ctx, st)
        claimed = self.sessions.mutate(session, claim) if factor.claims else session
        try:
            issued = factor.start_challenge(ctx)
        except ServiceUnavailable as exc:
            self._degrade(claimed, name)
            raise errors.unavailable(f"{exc}; the session continues in degraded mode",
                                     f"{exc.service.upper()}_SERVICE_UNAVAILABLE") from None
        except errors.ServiceError:
            if factor.claims:
                self.sessions.mutate(claimed, lambda st: factor.release(ctx, st, session.state))
            raise

        with self.rt.storage.transaction():  # what the session keeps and the audit record together
            if issued.nonce:
                nonce = issued.nonce

                def record(st: SessionState) -> None:
                    require_open(st)
                    if biometric:
                        require_room(len(st.challenges.get(name, [])), limit, f"{name} challenges")
                    st.challenges.setdefault(name, []).append(nonce)
                self.sessions.mutate(claimed, record)
            if issued.audit:
                self.rt.audit.append(issued.audit[0], caller.name, session.tenant_id, session.subject_id, issued.audit[1])
        return issued.response

    def start_challenge(self, req: mfa_pb2.StartBiometricChallengeRequest, budget: float | None = None, *,
                        caller: Principal):
        modality = MODALITIES.get(req.modality)
        if modality is None:
            self.sessions.open(req.session_id, self.clock(), caller)  # a bad session id is refused first
            raise errors.invalid_argument("modality must be face or voice", modality="unspecified")
        return self.challenge(modality, req.session_id, budget, caller=caller)

    def send_otp(self, req: mfa_pb2.SendOtpRequest, *, caller: Principal) -> mfa_pb2.SendOtpResponse:
        return self.challenge("sms_otp", req.session_id, shown=req, caller=caller)

    def payee_shown(self, req: mfa_pb2.SendOtpRequest | mfa_pb2.SendPushConfirmationRequest,
                    session: Session) -> dict[str, str] | None:
        """The payee a request says the user is shown, checked against the session's keyed hash of
        the one it started with (None: the session has none and the request names none). A session
        with a payee needs it named (PSD2 RTS art. 5, dynamic linking: the SMS or the app shows the
        amount and the payee); the MFA keeps only the hash, so it cannot name the payee itself, and
        no policy relaxes this (a tenant's action with ``payee: optional`` starts sessions without one)."""
        if not req.HasField("payee"):
            if not session.state.payee:
                return None
            raise errors.invalid_argument(
                "payee is required: the session was started with a payee, which the SMS or the push names with "
                "the amount (PSD2 dynamic linking); send payee (name, account_masked) as the user is shown it, "
                "the same as in StartAuthentication",
                "PAYEE_REQUIRED", payee="required: the session's payee")
        payee = requests.payee(req, needs=True)
        assert payee is not None
        shown = payee_object(*payee)
        if self.proofs.payee_hash(session.tenant_id, shown) != session.state.payee:
            raise errors.invalid_argument("payee is not the one this session was started with", payee="differs")
        return shown

    def _degrade(self, session: Session, modality: str) -> Session:
        policy = self._policy_of(session)

        def change(st: SessionState) -> None:
            st.plan = st.plan.degrade(modality, policy, st.device_usable)
        return self.sessions.mutate(session, change)

    # ------------------------------------------------------------------ factors
    def submit(self, req: mfa_pb2.SubmitFactorRequest, budget: float | None = None, *,
               caller: Principal) -> mfa_pb2.SubmitFactorResponse:
        """Checks the evidence (nothing is written for bad input), charges the attempt to the
        lockout, evaluates it, then settles the charge, records the outcome and its audit record in
        one transaction, which refuses a session decided meanwhile (SESSION_DECIDED)."""
        now = self.clock()
        session = self.sessions.open(req.session_id, now, caller)
        which = req.WhichOneof("evidence")
        if which is None:
            raise errors.invalid_argument("one of face, voice, otp or device evidence is required", evidence="missing")
        name = BY_EVIDENCE[which]
        return self.submit_evidence(session, name, getattr(req, which), now, budget, caller)[0]

    def submit_voice_stream(self, messages: Iterable, budget: float | None = None, *,
                            caller: Principal) -> mfa_pb2.SubmitFactorResponse:
        """StreamVoiceFactor: the voice factor of submit() with the audio streamed. The header is
        checked as VoiceEvidence is; the chunks are read (within mfa.ivr_stream's limits) while the
        voice service hears them, joined into blocks of up to mfa.ivr_stream.max_hold_s, so a stream
        refused midway has written nothing. Only the caller's end message ends the answer: a stream
        closed without it (a hang-up) is refused CANCELLED, as is the call to the voice service."""
        stream = iter(messages)
        first = next(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise errors.invalid_argument("the first message must be the header (session_id, challenge_nonce, "
                                          "format, binding); the audio chunks follow it", "HEADER_REQUIRED",
                                          header="required first")
        h = first.header
        now = self.clock()
        session = self.sessions.open(h.session_id, now, caller)
        rate = stream_byte_rate(h.format)
        header = mfa_pb2.VoiceEvidence(audio=common_pb2.Audio(format=h.format), challenge_nonce=h.challenge_nonce)
        if h.HasField("binding"):
            header.binding.CopyFrom(h.binding)
        cfg = self.settings.mfa.ivr_stream
        evidence = StreamedVoice(header, held(stream_chunks(stream, rate, cfg), rate, cfg.max_hold_s))
        return self.submit_evidence(session, "voice", evidence, now, budget, caller)[0]

    def submit_evidence(self, session: Session, name: str, evidence: Any, now: datetime, budget: float | None,
                        caller: Principal) -> tuple[mfa_pb2.SubmitFactorResponse, FactorOutcome, Session]:
        """submit() once the evidence's factor is known: (the response, the outcome, the session as stored)."""
        policy = self._policy_of(session)
        self.require_acceptable(policy, session, name)
        st, tenant, subject = session.state, session.tenant_id, session.subject_id
        limit = policy.session.max_submissions
        require_room(st.submissions, limit, "factor submissions")
        self.lockouts.check(tenant, subject, st.device.fp, policy.lockout, now, st.device_usable)
        factor = FACTORS[name]
        ctx = self.factor_context(session, policy, now, budget, caller=caller)
        factor.validate(ctx, evidence)
        attempt = self.lockouts.attempt(tenant, subject, st.device.fp, policy.lockout, now, st.device_usable,
                                          caller.name)
        try:
            outcome = factor.evaluate(ctx, evidence)
        except BaseException:
            self.lockouts.release(attempt, policy.lockout)
            raise
        bound = ctx.notes.get("bound")
        recorded: list[FactorOutcome] = []

        def change(st: SessionState) -> None:
            require_open(st)
            require_room(st.submissions, limit, "factor submissions")
            st.submissions += 1
            factor.settle(ctx, st, evidence)
            outcomes = [outcome, *ctx.also]
            if bound is not None and bound.pending_key:
                if st.pending_key not in (None, bound.pending_key):  # a concurrent capture by another key
                    outcomes = [FactorOutcome(name, False, veto=True, reasons=(
                        Reason("CAPTURE_KEY_CHANGED", "another key signed this session's earlier captures"),))]
                else:
                    st.pending_key = bound.pending_key
            st.factors.extend(outcomes)
            recorded[:] = outcomes
            if outcome.unavailable:
                st.plan = st.plan.degrade(name, policy, st.device_usable)
        try:
            # session, counters and audit records together; the session row first, then the audit
            # chain (as every writer takes them), so that concurrent submissions cannot deadlock
            with self.rt.storage.transaction():
                session = self.sessions.mutate(session, change)
                left = self.lockouts.settle(attempt, outcome, policy.lockout, caller.name).attempts_left
                self.rt.audit.append("mfa.factor", caller.name, tenant, subject, {
                    "session_id": session.id, "factor": name, "passed": outcome.passed, "veto": outcome.veto,
                    "llr": round(outcome.llr, 3), "unavailable": outcome.unavailable,
                    "reasons": [r.code for r in outcome.reasons], "binding": outcome.binding,
                    **({"device_id": bound.device_id} if bound is not None and bound.device_id else {}),
                    **({"terminal": bound.terminal} if bound is not None and bound.terminal else {}),
                    "also": [o.factor for o in ctx.also], **outcome.operating_point(), **ctx.notes.get("audit", {})})
        except errors.ServiceError:
            self.lockouts.release(attempt, policy.lockout)
            raise
        metrics.record_factors(recorded)
        if "otp_attempts_left" in ctx.notes:
            left = min(left, ctx.notes["otp_attempts_left"])
        d = decide(session.state.plan, session.state.factors)
        still = d.still_needed if d.outcome == "step_up" else ()
        return (mfa_pb2.SubmitFactorResponse(result=factor_result(outcome), still_acceptable=factor_sets(still),
                                             attempts_left=max(0, left)),
                outcome, session)

    # ------------------------------------------------------------------ decision
    def decide(self, req: mfa_pb2.DecideRequest, *, caller: Principal) -> mfa_pb2.DecideResponse:
        now = self.clock()
        session = self.sessions.load(req.session_id, now, caller)
        policy = self._policy_of(session)
        while True:
            if session.state.decision is not None:
                # an overdue review is denied now
                decided = self.reviews.settle_session(session).state.decision or session.state.decision
                return self._decision_response(decided)
            st = session.state
            locked = self.lockouts.locked_for_decision(session.tenant_id, session.subject_id, st.device.fp,
                                                       policy.lockout, now, st.factors)
            d = decide(st.plan, st.factors, locked)
            review_id = "rev_" + new_id() if d.outcome == "review" else ""
            token = self._sign(session, d, now)[0] if d.outcome == "allow" else ""  # no other outcome is a token
            stored = DecisionState(d.outcome, list(d.reasons), d.total, list(d.still_needed), list(d.amr), d.acr,
                                   review_id, token, now)
            if d.outcome not in FINAL:
                metrics.record_decision(d.outcome, d.reasons)
                return self._decision_response(stored)
            seen = len(st.factors)

            def change(st: SessionState, seen: int = seen, stored: DecisionState = stored) -> None:
                if st.decision is not None:
                    raise _AlreadyDecided(st.decision)
                if len(st.factors) != seen:  # a factor landed meanwhile: decide again with it
                    raise _Stale()
                st.decision = stored
            try:
                with self.rt.storage.transaction():  # the decision and everything it implies, or nothing
                    session = self.sessions.mutate(session, change)
                    st = session.state
                    if review_id:
                        self.reviews.open(session, d.reasons, review_id, now)
                    if d.outcome == "allow":
                        self.lockouts.success(session.tenant_id, session.subject_id, st.device.fp)
                        if st.place and st.place[0]:
                            self.store.subject_signals.put(SubjectSignalRecord(
                                session.tenant_id, session.subject_id, st.place[0], st.place[1], st.place[2], now))
                    self.rt.audit.append("mfa.decision", caller.name, session.tenant_id, session.subject_id, {
                        "session_id": session.id, "outcome": d.outcome, "reasons": [r.code for r in d.reasons],
                        "total_llr": d.total, "acr": d.acr, "amr": list(d.amr), "review_id": review_id,
                        "action": st.action, "policy_version": st.policy_version})
            except _AlreadyDecided as done:  # a concurrent Decide got there first
                return self._decision_response(done.decision)
            except _Stale:
                session = self.sessions.load(req.session_id, now, caller)
                continue
            metrics.record_decision(d.outcome, d.reasons)
            if review_id:
                self.reviews.notify()
            return self._decision_response(stored)

    def _sign(self, session: Session, d: Decision, now: datetime,
              extra: dict[str, Any] | None = None) -> tuple[str, float]:
        """An ALLOW's claims (services/mfa/tokens.py lists the common ones); besides them ``pay``,
        the keyed hash of the payee the device signed, ``fac``: per passed factor how it was bound
        and the operating point that decided it (factor_claims), and ``extra``: for an ALLOW a
        reviewer approved, ``rid`` the review and ``rvw`` "approved" (services/mfa/reviews.py)."""
        st = session.state
        claims: dict[str, Any] = {
            "aud": session.tenant_id, "sub": self.rt.pseudonymize(session.tenant_id, session.subject_id),
            "sid": session.id, "act": st.action, "decision": d.outcome, "amr": list(d.amr), "acr": d.acr,
            "pol": st.policy_version}
        if st.amount:
            claims["amt"] = {"cur": st.amount[0], "minor": st.amount[1]}
        if st.payee:
            claims["pay"] = st.payee  # keyed hash of the payee the device signed
        claims["fac"] = factor_claims(st.factors)
        return self.tokens.issue({**claims, **(extra or {})}, now.timestamp())

    @staticmethod
    def _decision_response(stored: DecisionState) -> mfa_pb2.DecideResponse:
        return mfa_pb2.DecideResponse(
            outcome=OUTCOMES[stored.outcome], reasons=to_protos(stored.reasons),
            still_needed=factor_sets(stored.still_needed), token=stored.token, acr=stored.acr,
            amr=stored.amr, review_id=stored.review_id, total_llr=stored.total)

    # ------------------------------------------------------------------ push confirmation
    def send_push(self, req: mfa_pb2.SendPushConfirmationRequest, *,
                  caller: Principal) -> mfa_pb2.SendPushConfirmationResponse:
        return self.push.send(req, caller)

    def confirm_transaction(self, req: mfa_pb2.ConfirmTransactionRequest, budget: float | None = None, *,
                            caller: Principal) -> mfa_pb2.ConfirmTransactionResponse:
        return self.push.confirm(req, budget, caller)

    def get_push_confirmation(self, req: mfa_pb2.GetPushConfirmationRequest, *,
                              caller: Principal) -> mfa_pb2.GetPushConfirmationResponse:
        return self.push.fetch(req, caller)

    def set_push_token(self, req: mfa_pb2.SetPushTokenRequest, *,
                       caller: Principal) -> mfa_pb2.SetPushTokenResponse:
        return self.push.set_token(req, caller)

    # ------------------------------------------------------------------ devices
    def start_device_registration(self, req: mfa_pb2.StartDeviceRegistrationRequest, *,
                                  caller: Principal):
        return self.registry.registration_options(req, caller)

    def register_device(self, req: mfa_pb2.RegisterDeviceRequest, *,
                        caller: Principal) -> mfa_pb2.RegisterDeviceResponse:
        return self.registry.register(req, caller)

    def list_devices(self, req: mfa_pb2.ListDevicesRequest) -> mfa_pb2.ListDevicesResponse:
        return self.registry.list(req)

    def revoke_device(self, req: mfa_pb2.RevokeDeviceRequest, *, caller: Principal) -> mfa_pb2.RevokeDeviceResponse:
        return self.registry.revoke(req, caller)

    # ------------------------------------------------------------------ administration
    def unlock(self, req: mfa_pb2.UnlockSubjectRequest, *, caller: Principal) -> mfa_pb2.UnlockSubjectResponse:
        tenant, subject = subject_ref(req.subject)
        reason = requests.label(req.reason, "reason") if req.reason else "unspecified"
        with self.rt.storage.transaction():  # the unlock and its audit record, or neither
            was_locked = self.lockouts.unlock(tenant, subject)
            self.rt.audit.append("mfa.subject_unlocked", caller.name, tenant, subject,
                                 {"reason": reason, "had_failures": was_locked})
        return mfa_pb2.UnlockSubjectResponse()

    def list_reviews(self, req: mfa_pb2.ListReviewsRequest) -> mfa_pb2.ListReviewsResponse:
        return self.reviews.list(req)

    def resolve_review(self, req: mfa_pb2.ResolveReviewRequest, *,
                       caller: Principal) -> mfa_pb2.ResolveReviewResponse:
        # the server checked the caller may act for the review's tenant
        rec, decision = self.reviews.resolve(req.review_id, req.approve, req.note, caller.name)
        return mfa_pb2.ResolveReviewResponse(review=self.reviews.proto(rec), decision=self._decision_response(decision))

    def get_review(self, req: mfa_pb2.GetReviewRequest) -> mfa_pb2.GetReviewResponse:
        case, decision = self.reviews.case(req.review_id)
        if decision is not None:
            case.decision.CopyFrom(self._decision_response(decision))
            case.decision.ClearField("token")  # the relying party's credential, not evidence
        return case

    def jwks(self) -> mfa_pb2.GetSigningKeysResponse:
        import json

        return mfa_pb2.GetSigningKeysResponse(jwks_json=json.dumps(self.signing.jwks()))


def factor_claims(outcomes: list[FactorOutcome]) -> list[dict[str, Any]]:
    """Per passed factor (its strongest attempt): how it was bound or proven, and the operating
    point that decided it (target and measured FMR, target and measured APCER of the PAD layer)."""
    best: dict[str, FactorOutcome] = {}
    for o in outcomes:
        if o.passed and (o.factor not in best or o.llr > best[o.factor].llr):
            best[o.factor] = o
    return [{"f": f, **({"bind": o.binding} if o.binding else {}), **o.operating_point()}
            for f, o in sorted(best.items())]


class _Stale(Exception):
    pass


class _AlreadyDecided(Exception):
    def __init__(self, decision: DecisionState) -> None:
        super().__init__("decided")
        self.decision = decision

