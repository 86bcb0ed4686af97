"""A bank's endpoint for BioGate's webhooks, as in the README ("Receiving webhooks"):

    BIOGATE_WEBHOOK_SECRETS='["<secret>"]' python clients/python/examples/webhook_receiver.py [PORT]

The secrets it accepts are a JSON list: while a secret rotates, '["<new>", "<old>"]'. It checks each
request's signature over the raw body, then records the event's id in SQLite
(BIOGATE_WEBHOOK_DB, default webhook-events.sqlite) in the transaction that acts on it: delivery
is at least once, and an event seen before is answered 200 without acting twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from biogate_client import webhooks

MAX_BODY = 1 << 20


def act(event: dict) -> None:
    """The bank's business (open a case in its back office, release a held payment...): here a line."""
    print(event["type"], event["data"].get("review_id"), event["data"].get("status", ""), flush=True)


def receiver(secrets: Sequence[str], db_path: str, on_event: Callable[[dict], None] = act,
             host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving: call serve_forever)."""
    db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS biogate_events (id TEXT PRIMARY KEY, type TEXT, received_at REAL)")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._answer(411)
            if not 0 <= length <= MAX_BODY:
                return self._answer(413)
            body = self.rfile.read(length)  # the bytes as sent: the signature covers them, not parsed JSON
            try:
                webhooks.verify(secrets, self.headers.get(webhooks.SIGNATURE_HEADER, ""), body, time.time())
            except ValueError as exc:
                return self._answer(400, str(exc))
            # The id inside the signed body, which the BioGate-Event-Id header repeats unsigned.
            event = json.loads(body)
            with lock:
                db.execute("BEGIN IMMEDIATE")
                try:
                    new = db.execute("INSERT OR IGNORE INTO biogate_events VALUES (?, ?, ?)",
                                     (event["id"], event["type"], time.time())).rowcount == 1
                    if new:
                        on_event(event)
                    db.execute("COMMIT")
                except Exception:
                    db.execute("ROLLBACK")  # not recorded: BioGate's retry gets another chance
                    return self._answer(500)
            self._answer(200)

        def _answer(self, status: int, reason: str = "") -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(reason.encode())))
            self.end_headers()
            self.wfile.write(reason.encode())

        def log_message(self, *args) -> None:
            pass  # the default logs every request line to stderr

    return ThreadingHTTPServer((host, port), Handler)


if __name__ == "__main__":
    server = receiver(json.loads(os.environ["BIOGATE_WEBHOOK_SECRETS"]),
                      os.environ.get("BIOGATE_WEBHOOK_DB", "webhook-events.sqlite"),
                      port=int(sys.argv[1]) if len(sys.argv) > 1 else 8080)
    print(f"listening on http://127.0.0.1:{server.server_port}/", flush=True)
    server.serve_forever()
