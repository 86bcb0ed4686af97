"""Per-RPC context shared by interceptors, handlers and the log formatter."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    tenants: frozenset[str]  # {"*"} for every tenant

    def may_act_for(self, tenant_id: str) -> bool:
        return "*" in self.tenants or tenant_id in self.tenants


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)
