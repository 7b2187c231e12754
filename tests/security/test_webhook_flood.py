"""A flood of junk deliveries: counted per reason, without a write per request.

Refusals are counted in memory by each gunicorn worker and added to their table (one
row per reason) every WEBHOOK_REJECTION_FLUSH_SECONDS. A trigger on that table counts
the row writes, so "far fewer writes than requests" is measured, not assumed; the
same trigger on a server that writes each refusal at once counts one per request.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError, connection

from payouts import stripe_events
from payouts.models import WebhookEvent, WebhookRejection
from payouts.services import inbox
from tests.payouts.helpers import Answer, Server, post, server_env

pytestmark = pytest.mark.django_db(transaction=True)

TABLE = WebhookRejection._meta.db_table
WRONG_SECRET = "whsec_not_one_of_ours"
FLUSH_S = 1.0


def _rejections() -> dict[str, int]:
    return dict(WebhookRejection.objects.values_list("reason", "count"))


def _wait_for_counts(expected: dict[str, int], timeout: float = 20) -> dict[str, int]:
    """The table's counts once they reach ``expected`` (or whatever they are at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = _rejections()
        if counts == expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


@pytest.fixture
def row_writes() -> Iterator[Any]:
    """A trigger counting every row written to the rejection table (an ON CONFLICT DO
    UPDATE fires it once per row it updates); yields a function reading the count."""
    with connection.cursor() as cursor:
        cursor.execute(f"""
            CREATE SEQUENCE IF NOT EXISTS test_rejection_writes;
            CREATE OR REPLACE FUNCTION test_count_rejection_write() RETURNS trigger
            LANGUAGE plpgsql AS $$ BEGIN PERFORM nextval('test_rejection_writes');
            RETURN NULL; END $$;
            CREATE TRIGGER test_rejection_writes AFTER INSERT OR UPDATE ON {TABLE}
            FOR EACH ROW EXECUTE FUNCTION test_count_rejection_write();""")

    def writes() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                           "FROM test_rejection_writes")
            return int(cursor.fetchone()[0])

    yield writes
    with connection.cursor() as cursor:
        cursor.execute(f"""DROP TRIGGER IF EXISTS test_rejection_writes ON {TABLE};
                           DROP FUNCTION IF EXISTS test_count_rejection_write();
                           DROP SEQUENCE IF EXISTS test_rejection_writes;""")


@pytest.fixture(scope="module")
def batching_server(test_database_url: str) -> Iterator[Server]:
    """Two worker processes counting refusals in memory, flushing every second."""
    server = Server(server_env(test_database_url,
                               WEBHOOK_REJECTION_FLUSH_SECONDS=str(FLUSH_S)), workers=2,
                    threads=4)
    yield server
    server.stop()


def _junk(kind: str) -> tuple[bytes, dict[str, str]]:
    payout = stripe_events.payout_object(stripe_events.new_id("po"), status="paid")
    body = stripe_events.encode(stripe_events.payout_event("payout.paid", payout))
    if kind == "bad_signature":
        return body, {"Stripe-Signature": stripe_events.sign(body, WRONG_SECRET)}
    return body, {}  # missing_signature


def _flood(url: str, kinds: list[str], connections: int = 32) -> list[Answer]:
    """Send one junk delivery per item of ``kinds`` from ``connections`` threads at once
    (bodies made first: the threads only send)."""
    jobs = [(index, _junk(kind)) for index, kind in enumerate(kinds)]
    answers: list[Any] = [None] * len(kinds)
    lock = threading.Lock()
    barrier = threading.Barrier(connections, timeout=30)

    def run() -> None:
        barrier.wait()
        while True:
            with lock:
                if not jobs:
                    return
                index, (body, headers) = jobs.pop()
            try:
                answers[index] = post(url, body, headers)
            except Exception as exc:
                answers[index] = exc

    threads = [threading.Thread(target=run) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return answers


def test_a_junk_flood_is_counted_per_reason_in_a_few_writes(batching_server, row_writes,
                                                            admin_client):
    """400 junk deliveries at once: every one answered with its reason, all counted
    within seconds, in a handful of row writes, on one row per reason; health shows them."""
    kinds = ["bad_signature"] * 300 + ["missing_signature"] * 100
    events, started = WebhookEvent.objects.count(), time.monotonic()

    answers = _flood(batching_server.url, kinds)

    assert all(isinstance(a, Answer) for a in answers), answers
    assert Counter((a.status, a.json()["error"]) for a in answers) == {
        (400, "bad_signature"): 300, (400, "missing_signature"): 100}
    counts = _wait_for_counts({"bad_signature": 300, "missing_signature": 100})
    elapsed = time.monotonic() - started
    assert counts == {"bad_signature": 300, "missing_signature": 100}
    # Each worker process writes each reason at most once per interval (and once more
    # as it catches up): a handful of writes, where a write per request would be 400.
    bound = 2 * 2 * (int(elapsed / FLUSH_S) + 2)
    assert row_writes() <= min(bound, 40), (row_writes(), elapsed)
    assert WebhookRejection.objects.count() == 2  # one row per reason, whatever was sent
    assert WebhookEvent.objects.count() == events

    page = admin_client.get("/health/")
    assert page.status_code == 200
    html = page.content.decode()
    for reason, count in counts.items():
        assert re.search(rf"{reason}</td>\s*<td[^>]*>{count}</td>", html), reason


def test_counting_at_once_is_a_write_per_refusal(inline_server, row_writes):
    """The control: with WEBHOOK_REJECTION_FLUSH_SECONDS=0 (the old behaviour, and the
    other tests' servers) the trigger sees one write per refused request."""
    answers = _flood(inline_server.url, ["bad_signature"] * 40, connections=8)

    assert {a.status for a in answers} == {400}
    assert _rejections() == {"bad_signature": 40}
    assert row_writes() == 40


def test_counts_still_in_memory_are_written_when_the_server_stops(test_database_url):
    """A worker that stops (deploys, max-requests restarts) adds its counts on the way out."""
    server = Server(server_env(test_database_url, WEBHOOK_REJECTION_FLUSH_SECONDS="3600"),
                    workers=2, threads=4)
    try:
        answers = _flood(server.url, ["bad_signature"] * 30, connections=6)
        assert {a.status for a in answers} == {400}
        time.sleep(1)
        assert _rejections() == {}  # counted in memory only: nothing written per request
    finally:
        server.stop()

    assert _rejections() == {"bad_signature": 30}


def test_counts_the_database_refuses_are_kept_for_the_next_flush(monkeypatch, settings):
    """A flush that fails keeps its counts; the next flush adds them too."""
    settings.WEBHOOK_REJECTION_FLUSH_SECONDS = 3600  # its thread waits: this test flushes
    counter = inbox.RejectionCounter()
    real_add = inbox.rejections_add
    calls = []

    def add_once_failing(counts: dict[str, Any]) -> None:
        calls.append(dict(counts))
        if len(calls) == 1:
            raise OperationalError("the database is restarting")
        real_add(counts)

    monkeypatch.setattr(inbox, "rejections_add", add_once_failing)

    counter.add("bad_signature")
    assert counter.flush() == 0
    assert _rejections() == {} and counter.pending() == {"bad_signature": 1}
    counter.add("bad_signature")
    counter.add("too_deep")
    assert counter.flush() == 3

    assert _rejections() == {"bad_signature": 2, "too_deep": 1}
    assert counter.pending() == {}
