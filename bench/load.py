"""The load generator: its own process, sending signed Stripe deliveries to 127.0.0.1.

    python -m bench.load SPEC.json RESULT.json

SPEC: ``port``, ``plan`` (a JSON file: a list of ``[event_id, type, payout_id,
created, account, amount]``, sent in that order), ``connections`` (threads, one persistent
HTTP/1.1 connection each), ``rate`` (events/s, open loop; null: closed loop, as fast
as the server answers), ``max_seconds`` (a hard bound on the run), ``resend``
(keep resending an event until it is acknowledged, like Stripe retries; otherwise
a failed delivery is counted and dropped), ``sample_every`` (keep every n-th latency),
``warmup_seconds`` (open loop: events due in the first seconds are sent but their
latencies are not kept; every connection is opened then, and the server's first
requests on them are not the steady state being measured).
Signed with another ``secret`` than the server's, every delivery is junk (400
bad_signature): the bench's flood.

Bodies are built before the clock starts (exactly as ``payouts.stripe_events``
builds them); each delivery is signed when it is sent, as Stripe signs it.
In open loop, latency counts from when the event was due, so a server that falls
behind shows it (no coordinated omission).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from payouts import stripe_events

PATH = "/webhooks/stripe/"


def build_body(event_id: str, event_type: str, payout_id: str, created: int,
               account: str | None, amount: int) -> bytes:
    status = stripe_events.TYPICAL_STATUS[event_type]
    extra = stripe_events.failed_payout_defaults() if status == "failed" else {}
    obj = stripe_events.payout_object(payout_id, status=status, created=created, amount=amount,
                                      **extra)
    event = stripe_events.payout_event(event_type, obj, account=account, created=created,
                                       event_id=event_id)
    return stripe_events.encode(event)


def signature(body: bytes, secret: bytes) -> str:
    """Stripe's scheme: v1 = HMAC-SHA256 of "<t>.<body>" with the endpoint secret."""
    timestamp = str(int(time.time()))
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class Run:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.port = int(spec["port"])
        self.secret = spec["secret"].encode()
        self.connections = int(spec.get("connections", 8))
        self.rate = spec.get("rate")
        self.max_seconds = float(spec.get("max_seconds", 600))
        self.resend = bool(spec.get("resend", False))
        self.sample_every = max(1, int(spec.get("sample_every", 1)))
        self.warmup = float(spec.get("warmup_seconds", 0))
        plan = json.loads(Path(spec["plan"]).read_text())
        self.ids = [row[0] for row in plan]
        self.bodies = [build_body(*row) for row in plan]
        self.lock = threading.Lock()
        self.next_index = 0
        self.latencies: list[float] = []  # seconds, from due (open loop) or sent
        # (when due or sent, in seconds from the start; latency): sampled as latencies
        self.timeline: list[tuple[float, float]] = []
        self.service: list[float] = []  # seconds, from sent to answered
        self.timeline_warmup: list[tuple[float, float]] = []  # as timeline, not sampled
        self.http_status: Counter[str] = Counter()
        self.answer_status: Counter[str] = Counter()
        self.duplicates = 0
        self.errors: Counter[str] = Counter()
        self.acked: set[str] = set()
        self.unacked: list[str] = []
        self.connects = 0
        self.sent = 0
        self.started = 0.0
        self.deadline = 0.0
        self.finished_at: list[float] = []

    def _take(self) -> int | None:
        with self.lock:
            if self.next_index >= len(self.bodies):
                return None
            index = self.next_index
            self.next_index += 1
            return index

    def _connect(self) -> http.client.HTTPConnection:
        with self.lock:
            self.connects += 1
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.connect()
        return conn

    def _send(self, conn: http.client.HTTPConnection | None, body: bytes
              ) -> tuple[http.client.HTTPConnection | None, int, bytes]:
        """One delivery on the thread's connection; reconnects if the server closed it."""
        for attempt in range(2):
            try:
                if conn is None:
                    conn = self._connect()
                conn.request("POST", PATH, body=body, headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                    "Stripe-Signature": signature(body, self.secret),
                })
                response = conn.getresponse()
                data = response.read()
                if response.will_close:
                    conn.close()
                    conn = None
                return conn, response.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A kept-alive connection the server had closed: once more on a new one.
                if conn is not None:
                    conn.close()
                conn = None
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def worker(self) -> None:
        conn: http.client.HTTPConnection | None = None
        latencies: list[float] = []
        service: list[float] = []
        timeline: list[tuple[float, float]] = []
        warmup: list[tuple[float, float]] = []
        try:
            while True:
                index = self._take()
                if index is None:
                    return
                due = self.started + index / self.rate if self.rate else None
                if due is not None:
                    pause = due - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                event_id, body = self.ids[index], self.bodies[index]
                tries, backoff = 0, 0.1
                while True:
                    if time.perf_counter() > self.deadline:
                        with self.lock:
                            self.unacked.append(event_id)
                            self.errors["deadline"] += 1
                        return
                    tries += 1
                    sent = time.perf_counter()
                    try:
                        conn, status, data = self._send(conn, body)
                        error = None if status == 200 else f"http_{status}"
                    except (OSError, http.client.HTTPException) as exc:
                        if conn is not None:
                            conn.close()
                        conn, status, data = None, 0, b""
                        error = type(exc).__name__
                    done = time.perf_counter()
                    with self.lock:
                        self.sent += 1
                        self.http_status[str(status)] += 1
                        if error is not None:
                            self.errors[error] += 1
                    if error is None:
                        break
                    if not self.resend or tries >= 1000:
                        with self.lock:
                            self.unacked.append(event_id)
                        break
                    time.sleep(backoff)  # as Stripe does: retry later, with backoff
                    backoff = min(backoff * 2, 1.0)
                if error is not None:
                    continue
                answer = json.loads(data)
                with self.lock:
                    self.acked.add(event_id)
                    self.answer_status[answer.get("status", "stored")] += 1
                    self.duplicates += bool(answer.get("duplicate"))
                warming = due is not None and due - self.started < self.warmup
                if warming:
                    warmup.append((due - self.started, done - due))
                elif index % self.sample_every == 0:
                    start = due if due is not None else sent
                    latencies.append(done - start)
                    service.append(done - sent)
                    timeline.append((start - self.started, done - start))
        finally:
            if conn is not None:
                conn.close()
            with self.lock:
                self.latencies.extend(latencies)
                self.service.extend(service)
                self.timeline.extend(timeline)
                self.timeline_warmup.extend(warmup)
                self.finished_at.append(time.perf_counter())

    def run(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self.worker, daemon=True)
                   for _ in range(self.connections)]
        self.started = time.perf_counter() + 0.05
        self.deadline = self.started + self.max_seconds
        wall_started = time.time()
        clock_started = wall_started + (self.started - time.perf_counter())
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.max_seconds + 120)
        elapsed = max(self.finished_at or [time.perf_counter()]) - self.started
        not_sent = len(self.bodies) - self.next_index
        return {
            "planned": len(self.bodies), "sent": self.sent, "not_sent": not_sent,
            "acknowledged": len(self.acked), "duplicates_answered": self.duplicates,
            "elapsed_s": elapsed, "wall_started": wall_started,
            "ack_per_s": len(self.acked) / elapsed if elapsed > 0 else None,
            "http_status": dict(self.http_status), "answer_status": dict(self.answer_status),
            "errors": dict(self.errors), "connects": self.connects,
            "latencies_s": self.latencies, "service_s": self.service,
            # the wall clock (time.time()) of offset 0 of ``timeline``, to line runs up
            "clock_started": clock_started, "timeline": self.timeline,
            "timeline_warmup": self.timeline_warmup,
            "acked_ids": sorted(self.acked) if self.resend else [],
            "unacked_ids": self.unacked,
            "rate": self.rate, "connections": self.connections,
            "cpu_s": time.process_time(),
        }


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = Run(spec).run()
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
