"""The inbox worker (`process_webhooks`) against real servers, processes and connections.

Every process here (gunicorn, workers) runs against the test database, so every
test commits what it sets up (``transaction=True``). Waits are bounded polls that
fail with a message; nothing asserts how long anything took.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from django.db import connection
from django.utils import timezone

from payouts import stripe_events
from payouts.models import (
    PaymentTransaction,
    PaymentTransfer,
    Payout,
    TransactionLog,
    WebhookEvent,
    WebhookEventAttempt,
)
from tests.dbsessions import wait_blocked
from tests.factories import make_payout
from tests.payouts.helpers import deliver, run_worker, start_worker

pytestmark = pytest.mark.django_db(transaction=True)

T = TypeVar("T")

WAIT_S = 90  # generous bound for every poll
PAYOUT_TABLE = Payout._meta.db_table
PENDING = [WebhookEvent.Status.RECEIVED, WebhookEvent.Status.FAILED]
Outcome = WebhookEventAttempt.Outcome
PROCESSED_RE = re.compile(r"processed (\d+) event\(s\)")


# --- waiting, processes, connections ------------------------------------------------


def wait_until(check: Callable[[], T], what: str, timeout: float = WAIT_S,
               interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def named_env(env: dict[str, str], name: str, **extra: str) -> dict[str, str]:
    """``env`` whose database connections carry ``application_name=name`` (pg_stat_activity)."""
    url = env["DATABASE_URL"]
    separator = "&" if "?" in url else "?"
    return {**env, "DATABASE_URL": f"{url}{separator}application_name={name}", **extra}


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def handled_count(stdout: str) -> int:
    match = PROCESSED_RE.search(stdout)
    assert match, f"the worker did not print 'processed N event(s)': {stdout!r}"
    return int(match.group(1))


class RunningWorker:
    """`process_webhooks` started with ``start_worker``; its pipes are read as it runs."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = start_worker(env, *args)
        self.stdout = self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        self.stdout, self.stderr = self.process.communicate()

    def _finish(self, timeout: float) -> int:
        self._reader.join(timeout)
        if self._reader.is_alive():
            self.process.kill()
            self._reader.join(30)
            raise AssertionError(f"worker {self.process.pid} did not exit within {timeout:.0f} s"
                                 f"\nstderr: {self.stderr[-3000:]}")
        return self.process.returncode

    def stop(self, timeout: float = WAIT_S) -> int:
        """SIGTERM, then wait (bounded) for the exit; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self._finish(timeout)

    def kill(self, timeout: float = WAIT_S) -> int:
        self.process.send_signal(signal.SIGKILL)
        return self._finish(timeout)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self._reader.join(30)


def once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`process_webhooks --once`, which must exit 0."""
    result = run_worker(env, "--once", timeout=WAIT_S)
    assert result.returncode == 0, f"--once exited {result.returncode}: {result.stderr[-3000:]}"
    return result


def pending_count() -> int:
    return WebhookEvent.objects.filter(status__in=PENDING).count()


def drain_with_once_workers(env: dict[str, str], workers: int = 1) -> int:
    """Run ``workers`` `--once` workers at a time until nothing is pending; events handled."""
    handled = 0
    deadline = time.monotonic() + WAIT_S
    while pending_count():
        assert time.monotonic() < deadline, (
            f"{pending_count()} event(s) still pending after {WAIT_S} s of --once workers")
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda _: once(env), range(workers)))
        handled += sum(handled_count(r.stdout) for r in results)
        time.sleep(0.1)
    return handled


def backends_blocked_by(blocker_pid: int, application_name: str) -> list[tuple[int, str]]:
    """Backends of ``application_name`` waiting on a lock that ``blocker_pid`` holds."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock' AND %s = ANY(pg_blocking_pids(pid))",
            [application_name, blocker_pid])
        return list(cursor.fetchall())


def backend_alive(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone() is not None


def idle_backend_of(application_name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                       "AND state = 'idle'", [application_name])
        return cursor.fetchone() is not None


# --- event histories ----------------------------------------------------------------


@dataclass
class History:
    """The events Stripe sent about one payout, oldest first, and the status they lead to."""

    payout: Payout
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def newest(self) -> dict[str, Any]:
        return max(self.events, key=lambda event: event["created"])

    @property
    def final_status(self) -> str:
        return str(self.newest["data"]["object"]["status"])


def payout_history(payout: Payout, rng: random.Random, start: int, *, updates: int,
                   fails: bool) -> History:
    """Some payout.updated (in transit, or a stale pending), payout.paid, maybe payout.failed;
    each event ``created`` one second after the one before."""
    history = History(payout)
    account = payout.seller.stripe_account_id if payout.seller else None
    po_id = str(payout.stripe_payout_id)
    created = start
    steps = [("payout.updated", rng.choice(["in_transit", "pending"])) for _ in range(updates)]
    steps += [("payout.updated", "in_transit"), ("payout.paid", "paid")]
    if fails:
        steps.append(("payout.failed", "failed"))
    for event_type, status in steps:
        extra = stripe_events.failed_payout_defaults() if status == "failed" else {}
        obj = stripe_events.payout_object(po_id, status=status, created=start,
                                          amount=payout.amount,
                                          metadata={"step": str(created)}, **extra)
        history.events.append(stripe_events.payout_event(event_type, obj, account=account,
                                                         created=created))
        created += 1
    return history


def build_load(rng: random.Random, payouts: int, updates: tuple[int, int],
               total: int | None = None) -> tuple[list[History], list[dict[str, Any]]]:
    """Histories for ``payouts`` new payouts (half of them failing in the end), and
    ``total`` deliveries (default: no duplicates): every event once, some twice more,
    shuffled."""
    start = int(time.time()) - 100_000
    failing = set(rng.sample(range(payouts), payouts // 2))
    histories = []
    for n in range(payouts):
        history = payout_history(make_payout(status="in_transit", transactions=3), rng,
                                 start + n * 100, updates=rng.randint(*updates),
                                 fails=n in failing)
        histories.append(history)
    distinct = [event for history in histories for event in history.events]
    total = len(distinct) if total is None else total
    assert len(distinct) <= total <= 3 * len(distinct), "cannot build that load"
    deliveries = distinct + rng.sample(distinct * 2, total - len(distinct))
    rng.shuffle(deliveries)
    return histories, deliveries


def deliver_all(url: str, deliveries: list[dict[str, Any]],
                clients: int = 8) -> list[tuple[str, int, dict[str, Any]]]:
    """Deliver from ``clients`` concurrent threads: (event id, HTTP status, answer)."""

    def one(event: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
        answer = deliver(url, event)
        return event["id"], answer.status, answer.json() if answer.status == 200 else {}

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, deliveries))


# --- final-state checks --------------------------------------------------------------


def assert_stored_once(answers: list[tuple[str, int, dict[str, Any]]],
                       histories: list[History]) -> None:
    bad = [(event_id, status) for event_id, status, _ in answers if status != 200]
    assert not bad, f"deliveries not answered 200: {bad[:10]}"
    distinct = {event["id"] for history in histories for event in history.events}
    first_time = Counter(event_id for event_id, _, body in answers if not body["duplicate"])
    assert set(first_time) == distinct and set(first_time.values()) == {1}, (
        "each distinct event must be answered duplicate=false exactly once: "
        f"{[(k, v) for k, v in first_time.items() if v != 1][:10]}")
    stored = Counter(WebhookEvent.objects.values_list("stripe_event_id", flat=True))
    assert set(stored) == distinct
    assert set(stored.values()) == {1}


def assert_ledger_matches(histories: list[History]) -> None:
    """Each payout at the status of its newest event, its money and transfers to match."""
    for history in histories:
        payout = Payout.objects.get(pk=history.payout.pk)
        newest = history.newest
        expected = history.final_status
        assert payout.status == expected, (
            f"{payout.stripe_payout_id} is {payout.status}, its newest event "
            f"{newest['type']} says {expected}")
        assert payout.last_event_id == newest["id"]
        assert payout.last_event_created == datetime.fromtimestamp(newest["created"], tz=UTC)
        txns = PaymentTransaction.objects.filter(transfers__payout_items__payout=payout)
        transfers = PaymentTransfer.objects.filter(payout_items__payout=payout)
        assert txns.count() == 3 and transfers.count() == 3
        payed_out = set(txns.values_list("payed_out", flat=True))
        transfer_statuses = set(transfers.values_list("status", flat=True))
        if expected == "failed":
            assert payed_out == {False}, f"{payout.stripe_payout_id} failed, money not released"
            assert transfer_statuses == {"failed"}
            assert payout.failure_code == "account_closed"
        else:
            assert payed_out == {True}, f"{payout.stripe_payout_id} paid, money released"
            assert transfer_statuses == {"paid"}
        applied_here = WebhookEvent.objects.filter(
            stripe_object_id=payout.stripe_payout_id, status="processed").count()
        assert payout.events_applied == applied_here


def assert_each_event_settled_once(histories: list[History]) -> None:
    """Every event final; one attempt settled it, at most one applied it; attempts add up."""
    newest_ids = {history.newest["id"] for history in histories}
    attempts_of: dict[int, list[WebhookEventAttempt]] = defaultdict(list)
    for attempt in WebhookEventAttempt.objects.order_by("id"):
        attempts_of[attempt.event_id].append(attempt)
    for event in WebhookEvent.objects.all():
        tried = attempts_of[event.pk]
        summary = [(a.trigger, a.outcome, a.reason, a.status_after) for a in tried]
        assert event.status in ("processed", "skipped", "ignored"), (
            f"{event.stripe_event_id} ended {event.status}: {event.last_error} {summary}")
        # Busy postponements give their attempt back: contention alone never uses the budget.
        counted = [a for a in tried
                   if not (a.outcome == Outcome.RETRY and a.reason.startswith("busy"))]
        assert event.attempts == len(counted), (
            f"{event.stripe_event_id}: {event.attempts} counted but {len(counted)} attempts "
            f"recorded besides busy postponements: {summary}")
        assert not [a for a in tried if a.outcome == Outcome.FAILED], summary
        applied = [a for a in tried if a.outcome == Outcome.APPLIED]
        assert len(applied) <= 1, f"{event.stripe_event_id} applied more than once: {summary}"
        # Busy postponements (retry) may come first; then one attempt settles the event.
        # A second one can only be a lease that ran out: it must find the event settled.
        settling = [a for a in tried if a.outcome != Outcome.RETRY]
        assert settling, f"{event.stripe_event_id} was never settled: {summary}"
        assert settling[0].status_after == event.status
        assert (settling[0].outcome == Outcome.APPLIED) == (event.status == "processed")
        for later in settling[1:]:
            assert later.outcome == Outcome.SKIPPED and later.reason.startswith("already "), (
                f"{event.stripe_event_id} settled twice: {summary}")
        if event.stripe_event_id in newest_ids:
            assert event.status == "processed", f"newest event not applied: {summary}"


# --- the tests ------------------------------------------------------------------------


def test_deferred_load_with_duplicates_out_of_order_drained_by_two_workers(
        deferred_server, worker_env):
    """400 shuffled deliveries with duplicates, 8 clients, drained by 2 workers: ledger exact."""
    histories, deliveries = build_load(random.Random(1234), payouts=20, updates=(3, 7),
                                       total=400)
    answers = deliver_all(deferred_server.url, deliveries, clients=8)
    assert len(answers) == 400
    assert_stored_once(answers, histories)
    assert all(body == {"received": True, "duplicate": body["duplicate"]}
               for _, _, body in answers), "deferred mode must not process in the request"
    assert not WebhookEventAttempt.objects.exists()

    workers = [RunningWorker(worker_env) for _ in range(2)]
    try:
        wait_until(lambda: pending_count() == 0, "2 workers to drain the inbox")
        codes = [worker.stop() for worker in workers]
    finally:
        for worker in workers:
            worker.cleanup()
    assert codes == [0, 0], [worker.stderr[-2000:] for worker in workers]
    handled = sum(handled_count(worker.stdout) for worker in workers)
    assert handled == WebhookEventAttempt.objects.filter(trigger="worker").count()

    assert_each_event_settled_once(histories)
    assert_ledger_matches(histories)


def test_inline_load_with_duplicates_out_of_order(inline_server, worker_env):
    """200 shuffled deliveries with duplicates processed inline, then --once: ledger exact."""
    histories, deliveries = build_load(random.Random(99), payouts=20, updates=(1, 4),
                                       total=200)
    answers = deliver_all(inline_server.url, deliveries, clients=8)
    assert_stored_once(answers, histories)
    for event_id, _, body in answers:
        if not body["duplicate"]:
            assert body.get("status") in ("processed", "skipped", "received", "failed"), (
                event_id, body)

    drain_with_once_workers(worker_env)

    assert_each_event_settled_once(histories)
    assert_ledger_matches(histories)
    inline = WebhookEventAttempt.objects.filter(trigger="inline").count()
    assert inline == WebhookEvent.objects.count(), "each stored event is tried inline once"


def failed_event_for(payout: Payout) -> dict[str, Any]:
    obj = stripe_events.payout_object(str(payout.stripe_payout_id), amount=payout.amount,
                                      status="failed", **stripe_events.failed_payout_defaults())
    return stripe_events.payout_event("payout.failed", obj,
                                      account=payout.seller.stripe_account_id)


def assert_failed_once(payout: Payout, event_id: str) -> WebhookEvent:
    event = WebhookEvent.objects.get(stripe_event_id=event_id)
    assert event.status == "processed", (event.status, event.last_error)
    payout.refresh_from_db()
    assert payout.status == "failed"
    assert payout.last_event_id == event_id
    assert payout.events_applied == 1
    txns = PaymentTransaction.objects.filter(transfers__payout_items__payout=payout)
    assert set(txns.values_list("payed_out", flat=True)) == {False}
    assert set(txns.values_list("actual_release_date", flat=True)) == {None}
    transfers = PaymentTransfer.objects.filter(payout_items__payout=payout)
    assert set(transfers.values_list("status", flat=True)) == {"failed"}
    assert event.attempts_log.filter(outcome=Outcome.APPLIED).count() == 1
    return event


def assert_untouched_ledger(payout: Payout) -> None:
    """The payout and its money as ``make_payout`` left them."""
    payout.refresh_from_db()
    assert payout.status == "in_transit" and payout.events_applied == 0
    assert payout.last_event_id == ""
    txns = PaymentTransaction.objects.filter(transfers__payout_items__payout=payout)
    assert set(txns.values_list("payed_out", flat=True)) == {True}


def assert_untouched(payout: Payout, event_id: str) -> None:
    """Nothing of processing ``event_id`` committed: payout, money, transfers, attempts."""
    assert_untouched_ledger(payout)
    transfers = PaymentTransfer.objects.filter(payout_items__payout=payout)
    assert set(transfers.values_list("status", flat=True)) == {"pending"}
    event = WebhookEvent.objects.get(stripe_event_id=event_id)
    assert event.status == "received" and event.processed_at is None
    assert not event.attempts_log.exists(), list(event.attempts_log.values())
    assert not TransactionLog.objects.filter(event=event).exists(), "no processing ended"


def test_worker_killed_mid_transaction_loses_nothing(deferred_server, worker_env, session):
    """SIGKILL while blocked on the payout lock: nothing committed; a later worker applies it."""
    payout = make_payout(status="in_transit")
    created_state = Payout.objects.values().get(pk=payout.pk)
    event = failed_event_for(payout)
    assert deliver(deferred_server.url, event).status == 200

    locker = session("read committed", name="payout-lock")
    locker.run(f"SELECT id FROM {PAYOUT_TABLE} WHERE id = %s FOR UPDATE", [payout.pk])
    name = unique_name("killed")
    worker = RunningWorker(named_env(worker_env, name))
    try:
        blocked = wait_until(lambda: backends_blocked_by(locker.pid, name),
                             "the worker to block on the locked payout row")
        backend_pid, query = blocked[0]
        assert PAYOUT_TABLE in query, query
        # Claimed (attempts counted at claim), in its transaction, nothing recorded yet.
        assert WebhookEvent.objects.get(stripe_event_id=event["id"]).attempts == 1
        assert_untouched(payout, event["id"])
        assert worker.kill() == -signal.SIGKILL
    finally:
        worker.cleanup()
    killed_pid = worker.process.pid
    locker.rollback()
    # The orphaned backend gets the lock, finds its client gone, and rolls back.
    wait_until(lambda: not backend_alive(backend_pid), "the killed worker's backend to end")
    assert_untouched(payout, event["id"])
    assert Payout.objects.values().get(pk=payout.pk) == created_state, "payout row unchanged"
    assert WebhookEvent.objects.get(stripe_event_id=event["id"]).attempts == 1

    # Its lease must run out before anyone takes the event again; then the abandoned
    # attempt is on its timeline, and the retry applies it.
    def processed_by_another() -> bool:
        once(worker_env)
        return WebhookEvent.objects.get(stripe_event_id=event["id"]).status == "processed"

    wait_until(processed_by_another, "a later worker to take the event after its lease",
               interval=0.5)
    stored = assert_failed_once(payout, event["id"])
    abandoned, applied = stored.attempts_log.all()
    assert (abandoned.trigger, abandoned.outcome) == ("abandoned", "failed")
    assert f":{killed_pid} stopped before it finished" in abandoned.error
    assert (applied.trigger, applied.outcome) == ("worker", "applied")
    assert not applied.worker.endswith(f":{killed_pid}")
    assert stored.attempts == 2, "one claim died with the killed worker, one applied"


def test_connection_terminated_mid_processing_is_retried(deferred_server, worker_env, session):
    """pg_terminate_backend on a worker blocked mid-transaction: retried, applied exactly once."""
    payout = make_payout(status="in_transit")
    event = failed_event_for(payout)
    assert deliver(deferred_server.url, event).status == 200

    locker = session("read committed", name="payout-lock")
    locker.run(f"SELECT id FROM {PAYOUT_TABLE} WHERE id = %s FOR UPDATE", [payout.pk])
    name = unique_name("terminated")
    worker = RunningWorker(named_env(worker_env, name))
    try:
        blocked = wait_until(lambda: backends_blocked_by(locker.pid, name),
                             "the worker to block on the locked payout row")
        backend_pid, query = blocked[0]
        assert PAYOUT_TABLE in query, query
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [backend_pid])
            assert cursor.fetchone() == (True,)
        wait_until(lambda: not backend_alive(backend_pid), "the terminated backend to end")
        assert_untouched_ledger(payout)
        locker.rollback()

        wait_until(lambda: WebhookEvent.objects.get(stripe_event_id=event["id"]).status
                   == "processed", "the running worker to apply the event after the failure")
        assert worker.process.poll() is None, "the worker must survive a lost connection"
        code = worker.stop()
    finally:
        worker.cleanup()
    assert code == 0, worker.stderr[-3000:]

    stored = assert_failed_once(payout, event["id"])
    attempts = list(stored.attempts_log.all())
    summary = [(a.outcome, a.error[:120]) for a in attempts]
    failed = [a for a in attempts if a.outcome == Outcome.FAILED]
    assert len(failed) == 1, summary
    assert re.search(r"terminat(ed|ing)|closed the connection|connection already closed",
                     failed[0].error), summary
    assert attempts[-1].outcome == Outcome.APPLIED, summary
    assert {a.worker for a in attempts} == {attempts[0].worker}, "the same worker, not restarted"
    assert stored.attempts == len(attempts)
    assert handled_count(worker.stdout) == len(attempts)


def test_sigterm_stops_an_idle_worker_cleanly(worker_env, pgbouncer):
    """SIGTERM to a running worker with nothing to do: exit code 0, 'processed 0 event(s)'."""
    if pgbouncer is not None:
        pytest.skip("watches the worker's own server backend open and close; behind "
                    "PgBouncer server backends are pooled and outlive their clients")
    name = unique_name("idle")
    worker = RunningWorker(named_env(worker_env, name))
    try:
        wait_until(lambda: idle_backend_of(name), "the worker to connect and go idle")
        assert worker.process.poll() is None
        code = worker.stop()
    finally:
        worker.cleanup()
    assert code == 0, worker.stderr[-3000:]
    assert handled_count(worker.stdout) == 0
    wait_until(lambda: not idle_backend_of(name), "the stopped worker's connection to close")


def test_once_drains_what_is_due_and_exits_with_nothing_due(deferred_server, worker_env):
    """--once applies every due event and exits 0; again, with nothing due, does nothing."""
    payouts = [make_payout(status="in_transit") for _ in range(5)]
    events = []
    for payout in payouts:
        obj = stripe_events.payout_object(str(payout.stripe_payout_id), amount=payout.amount,
                                          status="paid")
        events.append(stripe_events.payout_event("payout.paid", obj,
                                                 account=payout.seller.stripe_account_id))
    later = make_payout(status="in_transit")
    later_event = failed_event_for(later)
    for event in [*events, later_event]:
        assert deliver(deferred_server.url, event).status == 200
    not_due = timezone.now() + timedelta(hours=1)
    WebhookEvent.objects.filter(stripe_event_id=later_event["id"]).update(
        next_attempt_at=not_due)

    first = once(worker_env)
    assert handled_count(first.stdout) == 5
    for payout, event in zip(payouts, events, strict=True):
        stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
        assert stored.status == "processed" and stored.attempts == 1
        payout.refresh_from_db()
        assert payout.status == "paid"
    waiting = WebhookEvent.objects.get(stripe_event_id=later_event["id"])
    assert (waiting.status, waiting.attempts, waiting.next_attempt_at) == ("received", 0, not_due)

    second = once(worker_env)
    assert handled_count(second.stdout) == 0
    assert WebhookEventAttempt.objects.count() == 5
    assert_untouched(later, later_event["id"])


def test_many_once_workers_never_double_apply(deferred_server, worker_env):
    """4 --once workers started together on 60 events for 30 payouts: each applied once."""
    histories, _ = build_load(random.Random(7), payouts=30, updates=(0, 0))
    # Keep exactly 2 events per payout: its in-transit update and its newest (paid or failed).
    for history in histories:
        history.events = [history.events[0], history.newest]
    events = [event for history in histories for event in history.events]
    assert len(events) == 60
    random.Random(8).shuffle(events)
    answers = deliver_all(deferred_server.url, events, clients=8)
    assert_stored_once(answers, histories)

    start = threading.Barrier(4)

    def started_together(_: int) -> subprocess.CompletedProcess[str]:
        start.wait(timeout=WAIT_S)
        return once(worker_env)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(started_together, range(4)))
    handled = sum(handled_count(result.stdout) for result in results)
    # Conflicting SERIALIZABLE transactions of the 4 workers can use up the 4 tries of one
    # event's transaction; that event is then postponed ("busy", due again in 0.5-2 s, so
    # not due for these --once runs). A later --once finishes it.
    handled += drain_with_once_workers(worker_env)
    assert handled == WebhookEventAttempt.objects.count()

    assert_each_event_settled_once(histories)
    for event in WebhookEvent.objects.all():
        tried = list(event.attempts_log.order_by("id"))
        summary = [(a.outcome, a.reason) for a in tried]
        assert event.attempts == 1, summary  # busy postponements gave theirs back
        # One attempt settled the event; any before it changed nothing: busy postponements.
        assert tried[-1].outcome in (Outcome.APPLIED, Outcome.SKIPPED), summary
        for earlier in tried[:-1]:
            assert earlier.outcome == Outcome.RETRY, summary
            assert re.match(r"busy \(SQLSTATE (40001|40P01)\)", earlier.reason), summary
            assert earlier.status_after == "received", summary
    assert_ledger_matches(histories)


def test_an_event_that_keeps_failing_ends_dead(deferred_server, worker_env):
    """payout.paid for an unknown payout, WEBHOOK_MAX_ATTEMPTS=3 and a horizon already
    passed: retried later, then dead."""
    obj = stripe_events.payout_object(f"po_unknown{uuid.uuid4().hex[:12]}", status="paid")
    event = stripe_events.payout_event("payout.paid", obj)
    assert deliver(deferred_server.url, event).status == 200
    env = {**worker_env, "WEBHOOK_MAX_ATTEMPTS": "3", "WEBHOOK_RETRY_HORIZON_HOURS": "0"}

    seen: list[tuple[int, str, datetime | None]] = []

    def dead() -> bool:
        once(env)
        stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
        state = (stored.attempts, stored.status, stored.next_attempt_at)
        if not seen or seen[-1] != state:
            seen.append(state)
        return stored.status == "dead"

    wait_until(dead, "the event to end dead", interval=0.1)
    stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
    assert stored.attempts == 3, seen
    assert stored.next_attempt_at is None
    assert "not known yet" in stored.last_error
    attempts = list(stored.attempts_log.order_by("id"))
    assert [a.outcome for a in attempts] == [Outcome.RETRY] * 3
    assert [a.status_after for a in attempts] == ["failed", "failed", "dead"]
    assert not Payout.objects.filter(stripe_payout_id=obj["id"]).exists()

    # Each failure was scheduled after the attempt that failed, and later than the one before;
    # no attempt started before its schedule.
    scheduled = [(n, at) for n, status, at in seen if status == "failed"]
    assert scheduled, seen
    previous = None
    for n, at in scheduled:
        assert at is not None and at > attempts[n - 1].started_at, (n, at, seen)
        assert previous is None or at > previous, seen
        assert attempts[n].started_at >= at, (n, at, attempts[n].started_at)
        previous = at


def test_busy_postponements_never_bury_an_event(deferred_server, worker_env, session):
    """Busy postponements (40001 retries used up) give their attempt back: never dead."""
    payout = make_payout(status="in_transit")
    event = failed_event_for(payout)
    assert deliver(deferred_server.url, event).status == 200
    touch = f"UPDATE {PAYOUT_TABLE} SET updated_at = now() WHERE id = %s"

    # Our sessions take turns updating the payout while the worker waits for its row lock:
    # each commit makes the worker's SERIALIZABLE transaction fail with 40001 (the row
    # changed after its snapshot), and the next session is queued before the worker's retry.
    # 4 tries (txutils' 3 retries) per claim, 2 claims: the worker postpones the event twice.
    holder = session("read committed", name="touch-0")
    holder.run(touch, [payout.pk])
    name = unique_name("busy")
    worker = RunningWorker(named_env(worker_env, name, WEBHOOK_MAX_ATTEMPTS="2",
                                     WEBHOOK_RETRY_HORIZON_HOURS="0"))
    try:
        for n in range(1, 9):
            wait_until(lambda pid=holder.pid: backends_blocked_by(pid, name),
                       f"the worker's try {n} to wait for the payout row lock")
            successor = None
            if n < 8:
                successor = session("read committed", name=f"touch-{n}")
                successor.submit(touch, [payout.pk])
                wait_blocked(successor, timeout=WAIT_S)
            holder.commit()
            holder = successor
        wait_until(lambda: WebhookEvent.objects.get(stripe_event_id=event["id"]).status
                   not in WebhookEvent.PENDING, "the event to settle")
        assert worker.process.poll() is None, "the worker never stopped"
        assert worker.stop() == 0, worker.stderr[-3000:]
    finally:
        worker.cleanup()

    stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
    tried = list(stored.attempts_log.order_by("id"))
    summary = [(a.outcome, a.reason, a.status_after) for a in tried]
    busy = [a for a in tried if a.outcome == Outcome.RETRY and a.reason.startswith("busy")]
    assert len(busy) == 2, summary
    assert not [a for a in tried if a.outcome == Outcome.FAILED], "nothing ever failed"
    # The two claims were both busy postponements ("try again soon, without counting it as a
    # failure"); no worker stopped and the payout is free: the event must still be applied.
    assert stored.status != "dead", (
        f"an event that never failed was buried dead after {stored.attempts} busy "
        f"postponements, with last_error={stored.last_error!r}; attempts: {summary}")
    assert_failed_once(payout, event["id"])
