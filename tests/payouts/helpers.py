"""Signed deliveries and a real server process for webhook tests."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from payouts import stripe_events
from tests import TEST_SECRET_KEY

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"  # server logs, screenshots (git-ignored)
SECRET = "whsec_test_current_secret"
OLD_SECRET = "whsec_test_previous_secret"  # still accepted: a secret being rolled
WEBHOOK_PATH = "/webhooks/stripe/"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def post(base_url: str, body: bytes, headers: dict[str, str] | None = None,
         method: str = "POST", path: str = WEBHOOK_PATH) -> Answer:
    """One request on its own connection (http.client sends the body exactly as given)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.read(), dict(response.getheaders()))
    finally:
        conn.close()


def deliver(base_url: str, event: dict[str, Any], *, secret: str = SECRET,
            timestamp: int | None = None, body: bytes | None = None) -> Answer:
    """Deliver ``event`` the way Stripe does: JSON body, Stripe-Signature header."""
    body = body if body is not None else stripe_events.encode(event)
    return post(base_url, body, {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        "Stripe-Signature": stripe_events.sign(body, secret, timestamp=timestamp),
    })


def payout_event(event_type: str, payout_id: str, status: str | None = None, *, created: int,
                 object_created: int | None = None, account: str | None = None,
                 **fields: Any) -> dict[str, Any]:
    """A Stripe event for payout ``payout_id``, created at ``created``. A payout we know
    lends it what the ledger checks (account, amount, currency), as Stripe's own
    events would carry them; ``account`` and ``fields`` override."""
    from payouts.models import Payout

    ours = Payout.objects.select_related("seller").filter(stripe_payout_id=payout_id).first()
    if ours is not None:
        fields = {"amount": ours.amount, "currency": ours.currency, **fields}
        if account is None and ours.seller is not None:
            account = ours.seller.stripe_account_id
    status = status or stripe_events.TYPICAL_STATUS[event_type]
    if status == "failed":
        fields = {**stripe_events.failed_payout_defaults(), **fields}
    obj = stripe_events.payout_object(payout_id, status=status,
                                      created=created if object_created is None
                                      else object_created, **fields)
    return stripe_events.payout_event(event_type, obj, account=account, created=created)


def server_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DJANGO_", "STRIPE_", "WEBHOOK_", "LOG_"))}
    env.update({
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}",
        # The production settings (DEBUG off), over plain HTTP on 127.0.0.1, and never
        # the demo checkout's .env.
        "DJANGO_SECRET_KEY": TEST_SECRET_KEY,
        "DJANGO_HTTPS": "false",
        "DJANGO_ENV_FILE": "",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        "WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "WEBHOOK_RETRY_MAX_SECONDS": "1",
        "WEBHOOK_LEASE_SECONDS": "3",
        # Each refusal written at once, so a test reads its count right after the answer
        # (tests/security/test_webhook_flood.py starts servers that batch, as production).
        "WEBHOOK_REJECTION_FLUSH_SECONDS": "0",
    })
    env.update(extra)
    return env


class Server:
    """gunicorn serving the console in its own process, against the test database."""

    def __init__(self, env: dict[str, str], *, workers: int = 2, threads: int = 8) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ARTIFACTS.mkdir(exist_ok=True)
        self.log = open(ARTIFACTS / f"gunicorn-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            # The production settings, with the test's address and concurrency.
            [sys.executable, "-m", "gunicorn", "-c", "python:console.gunicorn_conf",
             "console.wsgi:application",
             "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
             "--threads", str(threads), "--worker-class", "gthread", "--timeout", "60"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {self.log.name}")
            try:
                post(self.url, b"", method="GET", path="/login/")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not start in time")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def run_worker(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`manage.py process_webhooks` in its own process (``--once`` to drain and exit)."""
    return subprocess.run([sys.executable, "manage.py", "process_webhooks", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "manage.py", "process_webhooks", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- the ledger, seen from a test -------------------------------------------------------


def ledger_state(payout: Any) -> dict[str, Any]:
    """Everything processing may change about a payout, its transactions and transfers."""
    from payouts.models import PaymentTransaction, PaymentTransfer, Payout

    payout = Payout.objects.get(pk=payout.pk)
    txns = PaymentTransaction.objects.filter(transfers__payout_items__payout=payout).order_by("id")
    transfers = PaymentTransfer.objects.filter(payout_items__payout=payout).order_by("id")
    return {
        "payout": {field: getattr(payout, field) for field in (
            "stripe_payout_id", "status", "arrival_date", "failure_code", "failure_message",
            "metadata", "reversed_by", "reversed_at", "review_reason", "last_event_id",
            "last_event_type", "last_event_created", "events_applied", "updated_at")},
        "txns": [(t.pk, t.payed_out, t.actual_release_date) for t in txns],
        "transfers": [(t.pk, t.status) for t in transfers],
    }


def drain(rounds: int = 20) -> None:
    """Process what waits (received or failed), as workers would once it is due, until
    nothing waits or nothing moves any more."""
    from payouts.models import WebhookEvent, WebhookEventAttempt
    from payouts.services.processing import event_process

    for _ in range(rounds):
        waiting = list(WebhookEvent.objects.filter(status__in=WebhookEvent.PENDING)
                       .values_list("pk", flat=True))
        outcomes = [event_process(event_id=pk, trigger="worker").kind for pk in waiting]
        if all(kind == WebhookEventAttempt.Outcome.RETRY for kind in outcomes):
            return


def run_together(*jobs: Any) -> list[Any]:
    """Run each job in its own thread (own connection), released at once by a Barrier;
    each job's result, or the exception it raised."""
    from django.db import connections

    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)

    def run(index: int, job: Any) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = job()
        except BaseException as exc:  # reported by the test, never lost in the thread
            results[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return results
