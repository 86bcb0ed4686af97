"""Declarative per-tenant MFA policy: schema, validated loading, reloading store."""

from .loader import PolicyError, Problem, load_policy, parse_policy
from .schema import BIOMETRIC, POSSESSION, ActionRule, Policy, Requirement
from .store import PolicyStore

__all__ = [
    "BIOMETRIC", "POSSESSION", "ActionRule", "Policy", "PolicyError", "PolicyStore", "Problem",
    "Requirement", "load_policy", "parse_policy",
]
