"""Junk deliveries, as fast as the server takes them: ``python -m bench.junk SPEC RESULT``.

SPEC: ``port``, ``count`` (requests), ``connections`` (persistent HTTP/1.1 connections,
each sending its next request once the last one is answered), ``secret`` (not the
server's: every request is refused for its signature), ``max_seconds``.

An attacker's CPU is not the server's. On the bench's machine it is: so this sender
spends as little of it as it can (one thread, non-blocking sockets, one request built
before the clock starts and sent again and again), and what the flood costs the
server shows, not what ``http.client`` in 64 threads costs the load generator.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.load import PATH, build_body, signature


def request_bytes(port: int, secret: str) -> bytes:
    body = build_body("evt_junk", "payout.paid", "po_junk", int(time.time()), None, 1100)
    head = (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Stripe-Signature: {signature(body, secret.encode())}\r\n\r\n")
    return head.encode() + body


class Connection:
    """One socket: sends the request, reads the answer (status, Content-Length body)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = b""

    def answer(self) -> str | None:
        """The status of a complete answer in the buffer (and drop it), else None. The
        body has a Content-Length or is chunked (a short one: it ends with "0" CRLF CRLF)."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1").lower()
        if "transfer-encoding: chunked" in head:
            last = self.buffer.find(b"\r\n0\r\n\r\n", end)
            if last < 0:
                return None
            body_end = last + 7
        else:
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip() == "content-length":
                    length = int(value)
            body_end = end + 4 + length
            if len(self.buffer) < body_end:
                return None
        self.buffer = self.buffer[body_end:]
        return head.split(" ", 2)[1]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    port, count = int(spec["port"]), int(spec["count"])
    request = request_bytes(port, spec["secret"])
    selector = selectors.DefaultSelector()
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    sent = answered = 0
    clock_started, started = time.time(), time.perf_counter()
    deadline = started + float(spec.get("max_seconds", 120))
    for _ in range(min(int(spec["connections"]), count)):
        conn = Connection(port)
        conn.sock.sendall(request)
        sent += 1
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    while answered < sent and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=1.0):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                errors[type(exc).__name__] += 1
                data = b""
            if not data:  # closed by the server: count it and stop using it
                selector.unregister(conn.sock)
                conn.sock.close()
                errors["closed"] += 1
                answered += 1
                continue
            conn.buffer += data
            while (status := conn.answer()) is not None:
                statuses[status] += 1
                answered += 1
                if sent < count:
                    conn.sock.sendall(request)
                    sent += 1
    elapsed = time.perf_counter() - started
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return {"sent": sent, "answered": answered, "elapsed_s": elapsed,
            "clock_started": clock_started, "http_status": dict(statuses),
            "errors": dict(errors), "cpu_s": time.process_time()}


def main(argv: list[str]) -> int:
    result = run(json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
