"""Per-RPC context shared by interceptors, handlers and the log formatter."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    tenants: frozenset[str]  # {"*"} for every tenant
    terminal_channel: str | None = None  # a registered terminal: the channel ("kiosk", "ivr") it serves

    def may_act_for(self, tenant_id: str) -> bool:
        return "*" in self.tenants or tenant_id in self.tenants


# The caller of a service object called in-process rather than over RPC (a CLI command, a worker, a
# benchmark, a test): no terminal to confine, every tenant; audit records name it "system".
SYSTEM = Principal("system", frozenset(), frozenset({"*"}))

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# Set by the interceptor once it authenticated the call; read by a servicer once (caller()) and
# handed on as a parameter, never read deeper down where a thread or callback may not see it.
principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def caller() -> Principal:
    """The current RPC's principal, for a servicer to pass to the service with the request. Raises
    outside an authenticated RPC, rather than letting a call go on as nobody."""
    found = principal.get()
    if found is None:
        raise RuntimeError("no authenticated principal: a servicer ran outside the server's interceptor")
    return found

# Monotonic time by which the current RPC must answer: the client's deadline, capped by the
# server's `server.rpc_timeout_s`. Handlers pass what is left to downstream calls and batchers.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


# Set by the interceptor on RPCs that run the models (option biogate.v1.model_work): takes the
# call's place in the service's admission queue unless it has one, or raises the refusal.
admission: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("admission", default=None)


def admit() -> None:
    """Waits for the current RPC's model-work slot (a no-op once it has one, or outside such an
    RPC). The interceptor admits a unary call before its handler runs and a client stream when the
    stream ends; a stream handler that starts the model work before the end calls this first."""
    take = admission.get()
    if take is not None:
        take()


# Set with ``admission``: gives the current RPC's model-work slot back before the call ends.
release: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("release", default=None)


def done_with_models() -> None:
    """Frees the current RPC's model-work slot (a no-op without one). A handler calls it when its model
    work is over and what is left waits more than it computes (the audit record's fsync under the
    database's write lock, the answer's send): holding the slot through that left a core idle while
    the next call queued for it. The slot's service-time estimate then covers the model work alone."""
    give = release.get()
    if give is not None:
        give()


def time_left(default: float = 30.0) -> float:
    """Seconds left before the current RPC's deadline (``default`` outside an RPC)."""
    import time

    end = deadline.get()
    return default if end is None else max(0.0, end - time.monotonic())
