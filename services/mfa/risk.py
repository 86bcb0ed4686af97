"""Risk rules: context signals in, a 0..100 score, a level, reasons and the extra requirement
that the policy attaches to them (more evidence, more factors, review or refusal)."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from .policy.schema import AmountBand, Policy, Requirement
from .reasons import Reason

DeviceState = Literal["bound", "drifted", "new", "unbound"]
LEVELS = ("low", "medium", "high", "critical")
MAX_CONVERSATION_CHARS = 20000


@dataclass(frozen=True)
class Place:
    country: str
    latitude: float | None = None
    longitude: float | None = None
    at: datetime | None = None


@dataclass(frozen=True)
class RiskSignals:
    device: DeviceState
    failures: int = 0  # consecutive failures of the subject so far
    sessions_in_window: int = 1  # sessions the subject started in the velocity window, this one included
    place: Place | None = None
    last_place: Place | None = None  # the last place an ALLOW came from
    conversation_text: str = ""
    amount: tuple[str, int] | None = None  # (currency, minor units)


@dataclass(frozen=True)
class Assessment:
    score: float
    level: str
    reasons: tuple[Reason, ...]
    requirement: Requirement
    band: AmountBand | None = None
    fraud_phrases: tuple[str, ...] = field(default=())


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", unicodedata.normalize("NFKC", text).casefold()).split())


class PhraseMatcher:
    """Finds script phrases in free text: case, width and spacing do not matter ("Any Desk",
    "ＡｎｙＤｅｓｋ", "安 全 账 户"), and a Latin phrase must consist of whole words of the text."""

    def __init__(self, phrases: dict[str, list[str]]) -> None:
        self._items = []
        self._max_words = 1
        for lang, items in phrases.items():
            for phrase in items:
                norm = _normalise(phrase)
                compact = norm.replace(" ", "")
                if compact.isascii():
                    self._max_words = max(self._max_words, len(norm.split()))
                self._items.append((lang, phrase, compact, compact.isascii()))

    def find(self, text: str) -> list[tuple[str, str]]:
        words = _normalise(text).split()
        compact = "".join(words)
        # every run of consecutive words as long as the longest phrase, with the spaces taken out
        joined = {"".join(words[i:i + n]) for n in range(1, self._max_words + 1) for i in range(len(words) - n + 1)}
        return [(lang, phrase) for lang, phrase, p, latin in self._items
                if (p in joined if latin else p in compact)]


def _km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(h)))


def amount_band(policy_bands: dict[str, list[AmountBand]], amount: tuple[str, int] | None) -> AmountBand | None:
    if amount is None or not policy_bands:
        return None
    bands = policy_bands.get(amount[0]) or policy_bands.get("*")
    if not bands:
        return None
    return next(b for b in bands if b.up_to is None or amount[1] <= b.up_to)


def combine(*reqs: Requirement | None) -> Requirement:
    present = [r for r in reqs if r is not None]
    return Requirement(
        extra_evidence=sum(r.extra_evidence for r in present),
        min_factors=max((r.min_factors for r in present), default=0),
        min_independent=max((r.min_independent for r in present), default=0),
        review=any(r.review for r in present),
        deny=any(r.deny for r in present),
    )


class RiskEngine:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        fp = policy.risk.rules.fraud_phrases
        self._phrases = PhraseMatcher(fp.phrases) if fp else None

    def assess(self, s: RiskSignals, bands: dict[str, list[AmountBand]]) -> Assessment:
        rules = self.policy.risk.rules
        score = 0.0
        reasons: list[Reason] = []

        def add(points: float, code: str, message: str) -> None:
            nonlocal score
            if points > 0:
                score += points
                reasons.append(Reason(code, message))

        if s.device == "new":
            add(rules.new_device.score, "NEW_DEVICE", "the device is not one of the subject's bound devices")
        elif s.device == "unbound":
            add(rules.unbound_device.score, "UNBOUND_DEVICE", "the subject has no bound device")
        elif s.device == "drifted":
            add(rules.device_drift.score, "DEVICE_DRIFT", "a bound device whose attributes changed (e.g. an OS update)")
        if s.failures:
            points = min(rules.failed_attempts.max, rules.failed_attempts.per_failure * s.failures)
            add(points, "FAILED_ATTEMPTS", f"{s.failures} consecutive failed attempts")
        if s.sessions_in_window > rules.velocity.max_sessions:
            add(rules.velocity.score, "VELOCITY",
                f"{s.sessions_in_window} sessions within {rules.velocity.window_s} s")
        self._location(s, add)
        band = amount_band(bands, s.amount)
        if band is not None and band.risk:
            add(band.risk, "AMOUNT_BAND", f"amount above {band_floor(bands, s.amount)} minor units")
        hits: list[tuple[str, str]] = []
        phrases = rules.fraud_phrases
        if phrases is not None and self._phrases is not None and s.conversation_text:
            hits = self._phrases.find(s.conversation_text)
            if hits:
                quoted = ", ".join(f'"{p}"' for _, p in hits[:5])
                add(phrases.score, "FRAUD_SCRIPT_PHRASE",
                    f"the conversation contains fraud-script phrases: {quoted}")
        score = min(100.0, score)
        lv = self.policy.risk.levels
        level = "critical" if score >= lv.critical else "high" if score >= lv.high else "medium" if score >= lv.medium else "low"
        fraud_review = Requirement(review=True) if hits and phrases is not None and phrases.review else None
        requirement = combine(getattr(self.policy.risk.responses, level), band, fraud_review)
        return Assessment(score, level, tuple(reasons), requirement, band, tuple(p for _, p in hits))

    def _location(self, s: RiskSignals, add) -> None:
        rule = self.policy.risk.rules.location_change
        now, last = s.place, s.last_place
        if now is None or last is None:
            return
        if now.country and last.country and now.country != last.country:
            add(rule.score, "LOCATION_CHANGE", f"country {now.country}, last trusted {last.country}")
        if (now.latitude is None or now.longitude is None or last.latitude is None or last.longitude is None
                or not (now.at and last.at)):
            return
        hours = max((now.at - last.at).total_seconds() / 3600.0, 1 / 60)
        speed = _km((last.latitude, last.longitude), (now.latitude, now.longitude)) / hours
        if speed > rule.impossible_travel_kmh:
            add(rule.impossible_travel_score, "IMPOSSIBLE_TRAVEL", f"{speed:.0f} km/h since the last trusted place")


def band_floor(bands: dict[str, list[AmountBand]], amount: tuple[str, int] | None) -> int:
    """The upper limit of the band below the one that applies (what the amount exceeds)."""
    if amount is None:
        return 0
    chosen = bands.get(amount[0]) or bands.get("*") or []
    below = [b.up_to for b in chosen if b.up_to is not None and amount[1] > b.up_to]
    return max(below, default=0)
