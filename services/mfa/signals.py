"""Account-change and fraud signals at the start of a session: the SIM-swap cooling-off.

For ``cooling_off.window_s`` after the subject's phone number changed, on a device bound within the
window while the subject had another device before it, or after the customer denied a push
confirmation (a fraud flag on the subject or the device), the actions of ``cooling_off.actions``
are held to ``cooling_off.requirement`` besides everything else: the new channel alone (the new
SIM's SMS codes, the new phone's key) is not enough, so a payment steps up to an independent
authenticator or a biometric.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from .policy.schema import Policy
from .reasons import Reason
from .risk import Assessment, combine
from .storage import DeviceRecord, MfaStore, SubjectSignalRecord


def recent_changes(policy: Policy, store: MfaStore, tenant: str, subject: str, signals: SubjectSignalRecord | None,
                   matched: DeviceRecord | None, now: datetime) -> list[Reason]:
    window = timedelta(seconds=policy.cooling_off.window_s)
    if not window:
        return []
    since = now - window
    out = []
    if signals is not None and signals.phone_changed_at and signals.phone_changed_at > since:
        out.append(Reason("RECENT_PHONE_CHANGE", "the phone number changed within the cooling-off window"))
    if matched is not None and matched.bound_at > since and any(
            d.id != matched.id and d.bound_at <= matched.bound_at
            for d in store.devices.list_for_subject(tenant, subject, include_revoked=True)):
        out.append(Reason("RECENT_DEVICE_BINDING", "this device was bound within the cooling-off window"))
    if signals is not None and signals.flagged_at and signals.flagged_at > since:
        out.append(Reason("RECENT_FRAUD_SIGNAL", "the customer denied a transaction within the cooling-off window"))
    if matched is not None and matched.flagged_at is not None:
        out.append(Reason("FLAGGED_DEVICE", "the customer denied a transaction started on this device"))
    return out


def apply_cooling_off(policy: Policy, action: str, risk: Assessment, reasons: list[Reason]) -> Assessment:
    """``risk`` with the cooling-off requirement, when the action is one it holds and a change is recent."""
    if not reasons or action not in policy.cooling_off.actions:
        return risk
    return dataclasses.replace(risk, reasons=risk.reasons + tuple(reasons),
                               requirement=combine(risk.requirement, policy.cooling_off.requirement))
