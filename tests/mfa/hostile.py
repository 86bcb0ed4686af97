"""Hostile HTTP endpoints on loopback for the outbound POSTs' tests (SMS gateway, FCM, webhooks): a
raw TCP (or TLS) server that reads each request (head and body) and then runs ``answer(conn)``, whatever a
broken or malicious receiver would send, or nothing at all; ``trickle``, an answer sent a byte at a time;
``finishes``, a bounded wait for a call such a server might hold."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Callable


class RawServer:
    def __init__(self, answer: Callable[[socket.socket], object], tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.tls = answer, tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hook"
        self.done = threading.Event()  # set on close: an answer waiting on it returns
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                while length and len(body) < int(length.group(1)):  # the whole request: a close with
                    chunk = conn.recv(65536)                         # unread bytes would reset it
                    if not chunk:
                        return
                    body += chunk
                self.answer(conn)
        except OSError:
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.sock.close()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finishes(call: Callable[[], object], within_s: float = 30.0) -> BaseException | None:
    """What ``call`` raised (None: it returned); fails the test when it is still running after
    ``within_s`` (a generous liveness bound, not a timing: the hostile server never stops)."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            box.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within_s)
    assert box, "the call was still held by the server"
    return box[0]


def trickle(stop: threading.Event, what: bytes) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(what)
        while not stop.wait(0.05):  # one byte at a time, each well inside the socket timeout
            conn.sendall(b"a")
    return answer
