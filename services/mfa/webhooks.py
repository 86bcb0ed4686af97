"""Webhooks to the bank: events written to an outbox table in the transaction of the change they
report (a crash loses none), delivered by a background worker as HMAC-SHA256-signed POSTs and
retried with exponential backoff up to a bounded number of attempts (at least once: receivers
deduplicate by the event id).

Each request carries ``BioGate-Event-Id`` and a ``BioGate-Signature`` over the body under every
active secret: services/common/webhook_signature.py, which the client SDK gets too
(``biogate_client.webhooks``), so that the bank's receiver checks with the code that signs.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from .config import ReviewWebhookConfig
from services.common.outbound import PostFailed, post_once
from services.common.webhook_signature import EVENT_HEADER, SIGNATURE_HEADER, signature
from .storage import MfaStore, WebhookEventRecord

log = logging.getLogger("biogate.mfa.webhooks")

BATCH = 50


class WebhookOutbox:
    def __init__(self, store: MfaStore, cfg: ReviewWebhookConfig, clock: Callable[[], datetime]) -> None:
        self.repo, self.cfg, self.clock = store.webhooks, cfg, clock

    @property
    def enabled(self) -> bool:
        return self.cfg.configured

    def enqueue(self, tenant: str, event_type: str, data: dict[str, Any], now: datetime) -> WebhookEventRecord | None:
        """Writes the event (in the caller's transaction, if any); None when the tenant has no webhook."""
        if self.cfg.target(tenant) is None:
            return None
        event_id = "evt_" + uuid.uuid4().hex
        body = json.dumps({"id": event_id, "type": event_type, "created_at": now.isoformat(), "tenant_id": tenant,
                           "data": data}, sort_keys=True, separators=(",", ":"))
        return self.repo.add(WebhookEventRecord(tenant, event_type, body, now, id=event_id, created_at=now))

    def backoff(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempts - 1)))

    def deliver_due(self) -> int:
        """One pass over the events due now; returns how many were delivered."""
        now = self.clock()
        delivered = 0
        # Receivers that gave no answer this pass (a timeout, a refused connection): their other
        # events fail alike, unsent, rather than each waiting out the timeout on the one worker
        # every bank shares. An HTTP answer, even a 5xx, came quickly: the next event is tried.
        silent: dict[str, str] = {}
        for rec in self.repo.due(now, BATCH):
            claimed = self.repo.claim(rec, now + timedelta(seconds=self.cfg.timeout_s * 2 + 30))
            if claimed is None:
                continue  # another replica's worker has it
            target = self.cfg.target(claimed.tenant_id)
            error = silent.get(target.url, "") if target is not None else ""
            if not error:
                error = self._post(claimed, now)
                if error and target is not None and not error.startswith("HTTP "):
                    silent[target.url] = f"not sent: {error} on an earlier event this pass"
            if not error:
                self.repo.settle(claimed.id, claimed.attempts, now, None, "")
                delivered += 1
            elif claimed.attempts >= self.cfg.max_attempts:
                self.repo.settle(claimed.id, claimed.attempts, None, None, error)
                log.error("webhook event abandoned", extra={"event_id": claimed.id, "event_type": claimed.event_type,
                                                            "attempts": claimed.attempts, "error": error})
            else:
                self.repo.settle(claimed.id, claimed.attempts, None, now + self.backoff(claimed.attempts), error)
                log.warning("webhook attempt failed", extra={"event_id": claimed.id, "attempt": claimed.attempts,
                                                             "error": error})
        return delivered

    def _post(self, rec: WebhookEventRecord, now: datetime) -> str:
        """"" when the receiver took the event (2xx), otherwise what went wrong."""
        target = self.cfg.target(rec.tenant_id)
        if target is None:
            return "the tenant's webhook was removed from the configuration"
        body = rec.body.encode()
        headers = {"Content-Type": "application/json", "User-Agent": "BioGate-Webhooks/1", EVENT_HEADER: rec.id,
                   SIGNATURE_HEADER: signature(target.active_secrets, body, int(now.timestamp()))}
        try:  # one attempt: the outbox retries (a redirect too is a failed delivery)
            post_once(target.url, body, headers, self.cfg.timeout_s)
            return ""
        except PostFailed as exc:
            return str(exc)

    def next_due_in(self) -> float | None:
        due = self.repo.next_due()
        return None if due is None else max(0.0, (due - self.clock()).total_seconds())


class Worker:
    """A background thread running ``tasks`` every ``interval_s``, sooner when woken (an event was
    committed) or when the outbox's next retry is due. Never on an RPC's thread."""

    def __init__(self, tasks: list[Callable[[], object]], interval_s: float, outbox: WebhookOutbox) -> None:
        self.tasks, self.interval_s, self.outbox = tasks, interval_s, outbox
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mfa-review-worker", daemon=True)

    def start(self) -> Worker:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            for task in self.tasks:
                try:
                    task()
                except Exception:  # a database hiccup must not end the worker; the next pass retries
                    log.exception("review worker task failed", extra={"task": getattr(task, "__name__", "?")})
            try:
                due = self.outbox.next_due_in() if self.outbox.enabled else None
            except Exception:
                due = None
            self._wake.wait(self.interval_s if due is None else min(self.interval_s, due))
