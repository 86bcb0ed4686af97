"""The policy document: what each action requires, per channel and amount, how risk changes it,
how factors are weighed, and what happens when a biometric service is down.

Every model forbids unknown keys, so that a misspelt setting is an error with its line, never a
silently kept default.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FactorName = Literal["face", "voice", "sms_otp", "device", "push"]
ChannelName = Literal["app", "kiosk", "ivr", "web"]
LevelName = Literal["low", "medium", "high", "critical"]
Acr = Literal["aal1", "aal2"]

BIOMETRIC: frozenset[str] = frozenset({"face", "voice"})
POSSESSION: frozenset[str] = frozenset({"sms_otp", "device", "push"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FactorSetList = list[list[FactorName]]


def _check_sets(sets: list[list[str]]) -> list[tuple[str, ...]]:
    out = []
    for i, s in enumerate(sets):
        if not s:
            raise ValueError(f"set {i} is empty")
        if len(set(s)) != len(s):
            raise ValueError(f"set {i} names a factor twice")
        out.append(tuple(s))
    return out


class BiometricFactor(Strict):
    """Weighs the LLR the face or voice service calibrated for its model and channel (the services
    know their calibration; a response without an LLR is no evidence)."""

    enabled: bool = True
    weight: float = Field(1.0, gt=0, le=2)  # multiplies the calibrated LLR
    llr_cap: float = Field(10.0, gt=0, le=50)  # |LLR| is clipped: one factor cannot carry everything
    deny_llr: float = Field(-3.0, lt=0)  # at or below: strong evidence of another person, DENY


class FaceFactor(BiometricFactor):
    require_liveness: bool = True


class VoiceFactor(BiometricFactor):
    require_spoof_check: bool = True
    # The voice factor needs the digit challenge this session handed out (replay defence); an
    # action or one of its channels may say otherwise (voice_challenge), which the voice service
    # must then allow for the tenant too (voice.tenants.<id>.require_challenge).
    require_challenge: bool = True


# Keys policies once had; a file that still names one is refused with this explanation.
REMOVED_KEYS = {
    "calibration_channel": "the face service applies the calibration of its own model and channel; remove the key",
    "calibration_channels": "the voice service applies the calibration of its own model and channel; remove the key",
    "uncalibrated_llr": "a response without a calibrated LLR is no evidence, never a default credit; remove the key",
}


class Window(Strict):
    limit: int = Field(ge=1)
    window_s: int = Field(ge=1, le=7 * 86400)


class OtpFactor(Strict):
    """SMS OTP, a restricted authenticator (NIST SP 800-63B-4)."""

    enabled: bool = True
    evidence: float = Field(3.0, gt=0, le=20)
    digits: int = Field(6, ge=6, le=10)
    ttl_s: int = Field(300, ge=30, le=600)  # at most 10 minutes
    max_attempts: int = Field(5, ge=1, le=10)  # per code
    resend_cooldown_s: int = Field(30, ge=0, le=600)
    per_phone: Window = Window(limit=5, window_s=3600)
    per_subject: Window = Window(limit=10, window_s=3600)


class DeviceBinding(Strict):
    min_acr: Acr = "aal2"  # the session's ALLOW must be at least this strong
    within_s: int = Field(300, ge=10, le=3600)  # after the decision


class DeviceFactor(Strict):
    enabled: bool = True
    evidence: float = Field(3.0, gt=0, le=20)
    drift_similarity: float = Field(0.7, gt=0, le=1)  # soft attributes that must still agree
    binding: DeviceBinding = DeviceBinding()


class PushFactor(Strict):
    """Push confirmation (services/mfa/factors/push.py): the customer's bound app approves or denies
    what it shows (action, amount, payee, place), signed by the device key, with number matching.
    When the app cannot be reached (gateway error, no device with a push token) the session falls
    back to ``fallback``, held to the action's own bar: never an ALLOW without a factor."""

    enabled: bool = True
    evidence: float = Field(4.0, gt=0, le=20)
    ttl_s: int = Field(90, ge=10, le=120)  # a confirmation answers within seconds, at most 2 minutes
    number_digits: int = Field(2, ge=2, le=4)  # the number the screen shows and the app must be given
    max_sends: int = Field(3, ge=1, le=10)  # confirmations per session (push fatigue)
    fallback: FactorSetList = [["voice", "sms_otp"]]
    # A voice factor of a fallback set may come from the registered IVR platform calling the
    # customer back (the digit challenge of this session), whatever channel the session started on.
    ivr_callback: bool = True

    @field_validator("fallback")
    @classmethod
    def _sets(cls, v):
        sets = _check_sets(v)
        if any("push" in s for s in sets):
            raise ValueError("a fallback set cannot hold push itself")
        return sets


class Factors(Strict):
    face: FaceFactor = FaceFactor()
    voice: VoiceFactor = VoiceFactor()
    sms_otp: OtpFactor = OtpFactor()
    device: DeviceFactor = DeviceFactor()
    push: PushFactor = PushFactor()

    def enabled(self, name: str) -> bool:
        return getattr(self, name).enabled


class Requirement(Strict):
    """What raises the bar: extra evidence, more distinct factors, factors from independent
    authenticators, a review, or a refusal."""

    extra_evidence: float = Field(0.0, ge=0)
    min_factors: int = Field(0, ge=0, le=4)
    # Passed factors must come from at least this many independent authenticators (PSD2 RTS art. 9):
    # a device key and the captures it signed are one authenticator, the SMS channel another.
    min_independent: int = Field(0, ge=0, le=4)
    review: bool = False
    deny: bool = False


class AmountBand(Requirement):
    up_to: int | None = Field(default=None, ge=0)  # minor units; null = no upper limit
    risk: float = Field(0.0, ge=0, le=100)


class ChannelRule(Strict):
    required: float | None = Field(default=None, gt=0)
    acceptable: FactorSetList | None = None
    voice_challenge: bool | None = None  # None: the action's, else factors.voice.require_challenge

    @field_validator("acceptable")
    @classmethod
    def _sets(cls, v):
        return None if v is None else _check_sets(v)


class ActionRule(Strict):
    required: float = Field(gt=0)  # total evidence (natural-log LLR units) to allow
    acceptable: FactorSetList = Field(min_length=1)
    channels: dict[ChannelName, ChannelRule] = {}
    # currency (ISO 4217, or "*" for any other) -> bands in increasing order of up_to
    amount_bands: dict[str, list[AmountBand]] = {}
    # The beneficiary the user is shown, signed in the transaction context: "required" refuses a
    # StartAuthentication without one (payments: dynamic linking of amount and payee, PSD2 RTS art. 5).
    # Unset: required where the action carries amounts, so a payment action written without the
    # line still links its codes to a payee; an amount without a beneficiary says "optional".
    payee: Literal["required", "optional"] = "optional"
    voice_challenge: bool | None = None  # None: factors.voice.require_challenge

    @model_validator(mode="before")
    @classmethod
    def _payee_default(cls, data):
        if isinstance(data, dict) and "payee" not in data and data.get("amount_bands"):
            return {**data, "payee": "required"}
        return data

    @field_validator("acceptable")
    @classmethod
    def _sets(cls, v):
        return _check_sets(v)

    @field_validator("amount_bands")
    @classmethod
    def _bands(cls, v: dict[str, list[AmountBand]]):
        for currency, bands in v.items():
            if currency != "*" and not (len(currency) == 3 and currency.isalpha() and currency.isupper()):
                raise ValueError(f"{currency!r} is not an ISO 4217 code or '*'")
            if not bands:
                raise ValueError(f"{currency}: no bands")
            limits = [b.up_to for b in bands]
            if limits[-1] is not None:
                raise ValueError(f"{currency}: the last band must have up_to: null (no upper limit)")
            bounded = [u for u in limits[:-1] if u is not None]
            if len(bounded) < len(limits) - 1:
                raise ValueError(f"{currency}: only the last band may have up_to: null")
            if any(b <= a for a, b in pairwise(bounded)):
                raise ValueError(f"{currency}: up_to must increase from band to band")
        return v


class RiskLevels(Strict):
    medium: float = Field(25, ge=0, le=100)
    high: float = Field(50, ge=0, le=100)
    critical: float = Field(80, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.medium <= self.high <= self.critical:
            raise ValueError("levels must satisfy medium <= high <= critical")
        return self


class RiskResponses(Strict):
    low: Requirement = Requirement()
    medium: Requirement = Requirement(extra_evidence=1.0)
    high: Requirement = Requirement(extra_evidence=3.0, min_factors=2)
    critical: Requirement = Requirement(min_factors=2, review=True)


class ScoreRule(Strict):
    score: float = Field(ge=0, le=100)


class FailedAttemptsRule(Strict):
    per_failure: float = Field(8, ge=0, le=100)
    max: float = Field(40, ge=0, le=100)


class VelocityRule(Strict):
    window_s: int = Field(3600, ge=1, le=86400)
    max_sessions: int = Field(10, ge=1)
    score: float = Field(20, ge=0, le=100)


class LocationRule(Strict):
    score: float = Field(20, ge=0, le=100)  # another country than the last trusted one
    impossible_travel_kmh: float = Field(900, gt=0)
    impossible_travel_score: float = Field(40, ge=0, le=100)


class FraudPhrases(Strict):
    """Phrases of social-engineering scripts looked for in chat/IVR transcripts."""

    score: float = Field(60, ge=0, le=100)
    review: bool = True
    phrases: dict[str, list[str]] = Field(min_length=1)  # language -> phrases

    @field_validator("phrases")
    @classmethod
    def _non_empty(cls, v: dict[str, list[str]]):
        for lang, items in v.items():
            if not items or any(not p.strip() for p in items):
                raise ValueError(f"{lang}: phrases must be non-empty strings")
        return v


class RiskRules(Strict):
    new_device: ScoreRule = ScoreRule(score=25)  # the subject has bound devices; not this one
    unbound_device: ScoreRule = ScoreRule(score=10)  # the subject has no bound device at all
    device_drift: ScoreRule = ScoreRule(score=5)  # a bound device whose attributes drifted
    failed_attempts: FailedAttemptsRule = FailedAttemptsRule()
    velocity: VelocityRule = VelocityRule()
    location_change: LocationRule = LocationRule()
    fraud_phrases: FraudPhrases | None = None


class Risk(Strict):
    levels: RiskLevels = RiskLevels()
    responses: RiskResponses = RiskResponses()
    rules: RiskRules = RiskRules()


class Degraded(Strict):
    """When a biometric service is unavailable: these sets, held to ``required``. A session
    satisfied only through them ends in REVIEW, never ALLOW: an outage must not lower the bar."""

    acceptable: FactorSetList = [["sms_otp", "device"]]
    required: float = Field(6.0, gt=0)

    @field_validator("acceptable")
    @classmethod
    def _sets(cls, v):
        return _check_sets(v)


class Lockout(Strict):
    """NIST SP 800-63B-4 § 3.2.2: at most 5 consecutive failures (10 for biometrics with
    presentation attack detection), throttled with growing delays before the limit, then locked for
    a bounded time. Counted per subject and per source (the device or terminal a session runs on):
    a session on the subject's bound device is held to its own device's counter only, so that
    failures from elsewhere slow an attacker down without locking the customer out of their phone."""

    max_failures: int = Field(5, ge=1, le=100)
    max_failures_with_liveness: int = Field(10, ge=1, le=100)
    delay_after: int = Field(3, ge=1)  # failures (of max_failures' kind) before throttling
    delay_s: float = Field(5.0, ge=0, le=3600)  # wait before the next attempt; doubles each time
    # How long a lock lasts. 0 (until an administrator unlocks) lets anyone who can start sessions
    # for a subject id lock its owner out: allowed, never the default.
    subject_lock_s: int = Field(900, ge=0)
    device_lock_s: int = Field(3600, ge=0)
    # The failure counters of devices bound to no one that a subject keeps, its newest ones: an
    # attacker who invents a fingerprint per lock of the subject would otherwise add a counter each
    # time, and a locked one is never purged (a device lock of 0 s lasts until an administrator
    # unlocks). Each one dropped is audited (mfa.device_counters_dropped); the subject's counter, and
    # those of the tenant's bound devices (the customer's own phone), are never dropped.
    device_counters_per_subject: int = Field(10, ge=1)


class Binding(Strict):
    """How biometric captures count (injection defence). A face or voice capture counts only with a
    valid capture binding: a signature over the transaction context (services/mfa/binding.py) by a
    bound device's key or WebAuthn credential, by the key a new device will register, or the
    submission of a registered terminal on its own channel."""

    # A capture signed by a bound device's key also proves the device factor: the signature covers
    # the session nonce and more, which is all a DeviceProof shows.
    proves_device: bool = True
    # On a device that is not bound yet, a capture may be signed by the key the session will
    # register. It proves no possession factor (an attacker's own phone could hold such a key).
    new_device_key: bool = True
    # False: every acceptable set holding a biometric must hold a possession factor (device or
    # sms_otp), checked when the policy loads (NIST SP 800-63B-4: a biometric is never a factor alone).
    biometric_alone: bool = False


class CoolingOff(Strict):
    """The SIM-swap defence: for ``window_s`` after the subject's phone number changed, or on a
    device bound within ``window_s`` while the subject had another one before, the ``actions`` are
    held to ``requirement`` besides everything else (the new channel alone is not enough)."""

    window_s: int = Field(86400, ge=0, le=30 * 86400)  # 0: off
    actions: list[str] = ["payment"]  # (the default applies to a policy's payment action, if it has one)
    requirement: Requirement = Requirement(min_factors=2, min_independent=2, extra_evidence=3.0)


class SessionLimits(Strict):
    """What one session may take, passed attempts included (the lockout counts failures only): each
    submission runs a factor's check (a biometric one the models) and grows the session's record,
    each biometric challenge asks its service. Beyond them the caller starts a new session, which
    the risk rules' velocity counts."""

    max_submissions: int = Field(12, ge=1, le=100)
    max_biometric_challenges: int = Field(5, ge=1, le=50)  # per modality


class Policy(Strict):
    version: str = Field(min_length=1, max_length=64)
    description: str = ""
    factors: Factors = Factors()
    actions: dict[str, ActionRule] = Field(min_length=1)
    risk: Risk = Risk()
    degraded: Degraded = Degraded()
    lockout: Lockout = Lockout()
    binding: Binding = Binding()
    cooling_off: CoolingOff = CoolingOff()
    session: SessionLimits = SessionLimits()

    def voice_challenge(self, action: str, channel: str) -> bool:
        """Whether the voice factor needs the digit challenge in a session of this action and channel."""
        rule = self.actions[action]
        chan = rule.channels.get(channel)  # type: ignore[call-overload]
        for value in (chan.voice_challenge if chan else None, rule.voice_challenge):
            if value is not None:
                return value
        return self.factors.voice.require_challenge

    @model_validator(mode="after")
    def _biometric_with_possession(self):
        if self.binding.biometric_alone:
            return self
        where = [(f"actions.{name}.acceptable", a.acceptable) for name, a in self.actions.items()]
        where += [(f"actions.{name}.channels.{ch}.acceptable", c.acceptable) for name, a in self.actions.items()
                  for ch, c in a.channels.items() if c.acceptable]
        where += [("degraded.acceptable", self.degraded.acceptable), ("factors.push.fallback", self.factors.push.fallback)]
        bad = [f"{path}.{i} {list(s)}" for path, sets in where for i, s in enumerate(sets)
               if set(s) & BIOMETRIC and not set(s) & POSSESSION]
        if bad:
            raise ValueError("a biometric never counts alone: add device or sms_otp to " + "; ".join(bad)
                             + " (or set binding.biometric_alone: true)")
        return self

    @model_validator(mode="after")
    def _factors_enabled(self):
        used = {f for a in self.actions.values() for s in a.acceptable for f in s}
        used |= {f for a in self.actions.values() for c in a.channels.values() for s in c.acceptable or () for f in s}
        off = sorted(f for f in used if not self.factors.enabled(f))
        if off:
            raise ValueError(f"actions name disabled factors: {', '.join(off)}")
        unknown = sorted(a for a in self.cooling_off.actions if a not in self.actions)
        if unknown and "actions" in self.cooling_off.model_fields_set:  # the default names payment
            raise ValueError(f"cooling_off.actions names actions the policy does not have: {', '.join(unknown)}")
        return self
