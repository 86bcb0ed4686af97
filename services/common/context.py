"""Per-RPC context shared by interceptors, handlers and the log formatter."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    tenants: frozenset[str]  # {"*"} for every tenant
    terminal_channel: str | None = None  # a registered terminal: the channel ("kiosk", "ivr") it serves

    def may_act_for(self, tenant_id: str) -> bool:
        return "*" in self.tenants or tenant_id in self.tenants


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)

# Monotonic time by which the current RPC must answer: the client's deadline, capped by the
# server's `server.rpc_timeout_s`. Handlers pass what is left to downstream calls and batchers.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def time_left(default: float = 30.0) -> float:
    """Seconds left before the current RPC's deadline (``default`` outside an RPC)."""
    import time

    end = deadline.get()
    return default if end is None else max(0.0, end - time.monotonic())
