"""Staff replays: the same processor, audited, and safe to run twice or twice at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connections

from payouts import stripe_events
from payouts.models import Seller, TransactionLog, WebhookEvent
from payouts.services import inbox
from payouts.services.outcome import Outcome, ProcessingOutcome
from payouts.services.processing import event_process, event_replay
from tests.factories import make_payout, make_seller
from tests.payouts.helpers import ledger_state, payout_event

pytestmark = pytest.mark.django_db(transaction=True)

T0 = int(time.time()) - 3600


def payout_evt(event_type: str, payout_id: str, status: str, *, at: int = 0,
               **fields: Any) -> dict[str, Any]:
    return payout_event(event_type, payout_id, status, created=T0 + at, object_created=T0,
                        **fields)


def store(event: dict[str, Any]) -> WebhookEvent:
    """Store an event as the webhook endpoint does (inline mode)."""
    recorded = inbox.event_record(event, stripe_events.encode(event), {}, lease_s=60)
    assert recorded.event_id is not None
    return WebhookEvent.objects.get(pk=recorded.event_id)


def early_event(event_type: str, status: str, po: str, seller: Seller,
                transactions: int) -> dict[str, Any]:
    """An event for ``make_payout(seller, stripe_payout_id=po, transactions=…)``, made
    before that payout exists."""
    return payout_evt(event_type, po, status, at=10, account=seller.stripe_account_id,
                      amount=1000 * transactions)


def failed_event_of_unknown_payout(event_type: str = "payout.paid", status: str = "paid",
                                   transactions: int = 2) -> tuple[WebhookEvent, str, Seller]:
    """An event processed inline before its payout existed: left ``failed`` for a retry.
    The payout to make afterwards: ``make_payout(seller, stripe_payout_id=po, ...)``."""
    po, seller = stripe_events.new_id("po"), make_seller()
    row = store(early_event(event_type, status, po, seller, transactions))
    outcome = event_process(event_id=row.pk, trigger="inline")
    assert outcome.kind == Outcome.RETRY
    row.refresh_from_db()
    assert row.status == WebhookEvent.Status.FAILED
    return row, po, seller


@pytest.fixture
def staff() -> User:
    return User.objects.create_user("support", password="x" * 12, is_staff=True)


def test_replaying_a_failed_event_applies_it_and_records_the_staff_user(staff):
    """A failed event whose payout now exists is applied by a replay, audited with the user."""
    row, po, seller = failed_event_of_unknown_payout()
    payout = make_payout(seller, stripe_payout_id=po, status="in_transit", transactions=2)

    outcome = event_replay(event_id=row.pk, requested_by=staff)

    assert outcome == ProcessingOutcome(Outcome.APPLIED, "in_transit → paid", payout.pk,
                                        "processed")
    row.refresh_from_db()
    payout.refresh_from_db()
    assert row.status == WebhookEvent.Status.PROCESSED
    assert row.next_attempt_at is None
    assert payout.status == "paid"
    assert payout.events_applied == 1
    assert payout.last_event_id == row.stripe_event_id
    inline, replay = row.attempts_log.all()
    assert (inline.trigger, inline.outcome, inline.requested_by) == ("inline", "retry", None)
    assert (replay.trigger, replay.outcome) == ("replay", "applied")
    assert replay.requested_by == staff
    assert replay.status_after == "processed"
    [log] = TransactionLog.objects.filter(event=row, payout=payout)
    assert (log.isolation_level, log.outcome) == ("serializable", "committed")


def test_replaying_a_processed_event_changes_nothing(staff):
    """Replaying an applied event: skipped 'already applied', ledger and event unchanged."""
    payout = make_payout(status="paid", transactions=3)
    event = payout_evt("payout.failed", payout.stripe_payout_id, "failed", at=10,
                       **stripe_events.failed_payout_defaults())
    row = store(event)
    assert event_process(event_id=row.pk, trigger="inline").kind == Outcome.APPLIED
    row.refresh_from_db()
    before, event_before = ledger_state(payout), (row.status, row.processed_at, row.attempts)

    outcome = event_replay(event_id=row.pk, requested_by=staff)

    assert outcome == ProcessingOutcome(Outcome.SKIPPED, "already applied", None, "processed")
    assert ledger_state(payout) == before
    row.refresh_from_db()
    assert (row.status, row.processed_at, row.attempts) == event_before
    last = row.attempts_log.last()
    assert (last.trigger, last.outcome, last.requested_by) == ("replay", "skipped", staff)


def test_replaying_a_dead_event_processes_it(settings, staff):
    """A dead event (retries exhausted) is brought back by a replay and becomes processed."""
    settings.WEBHOOK_MAX_ATTEMPTS = 1
    settings.WEBHOOK_RETRY_HORIZON_HOURS = 0
    po, seller = stripe_events.new_id("po"), make_seller()
    row = store(early_event("payout.paid", "paid", po, seller, transactions=2))
    assert event_process(event_id=row.pk, trigger="inline").status_after == "dead"
    row.refresh_from_db()
    assert row.status == WebhookEvent.Status.DEAD
    assert event_process(event_id=row.pk, trigger="worker").reason == "already dead"
    payout = make_payout(seller, stripe_payout_id=po, status="in_transit", transactions=2)

    outcome = event_replay(event_id=row.pk, requested_by=staff)

    assert outcome.kind == Outcome.APPLIED
    row.refresh_from_db()
    payout.refresh_from_db()
    assert row.status == WebhookEvent.Status.PROCESSED
    assert payout.status == "paid" and payout.events_applied == 1
    assert list(row.attempts_log.values_list("trigger", "outcome")) == [
        ("inline", "retry"), ("worker", "skipped"), ("replay", "applied")]


def test_two_replays_at_once_apply_the_event_exactly_once(staff):
    """Two staff replays of one failed event at the same moment (5 rounds): applied once."""
    for round_no in range(5):
        row, po, seller = failed_event_of_unknown_payout()
        payout = make_payout(seller, stripe_payout_id=po, status="in_transit", transactions=2)
        barrier = threading.Barrier(2)
        results: list[Any] = [None, None]

        def replay(index: int, event_pk: int = row.pk, gate: threading.Barrier = barrier,
                   out: list[Any] = results) -> None:
            try:
                gate.wait(timeout=30)
                out[index] = event_replay(event_id=event_pk, requested_by=staff)
            except BaseException as exc:  # reported below, never lost in the thread
                out[index] = exc
            finally:
                connections.close_all()

        threads = [threading.Thread(target=replay, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a replay thread hung"

        assert all(isinstance(r, ProcessingOutcome) for r in results), (round_no, results)
        kinds = sorted(r.kind for r in results)
        assert kinds == [Outcome.APPLIED, Outcome.SKIPPED], (round_no, results)
        skipped = next(r for r in results if r.kind == Outcome.SKIPPED)
        assert skipped.reason == "already applied"
        replays = row.attempts_log.filter(trigger="replay")
        assert sorted(replays.values_list("outcome", flat=True)) == ["applied", "skipped"]
        assert all(a.requested_by == staff for a in replays)
        payout.refresh_from_db()
        row.refresh_from_db()
        assert payout.events_applied == 1
        assert payout.status == "paid"
        assert row.status == WebhookEvent.Status.PROCESSED
        for log in TransactionLog.objects.filter(event=row):
            assert log.outcome == "committed"
            assert log.attempts == 1 + len(log.sqlstates)


def test_a_double_replay_in_sequence_gives_the_same_state_as_one(staff):
    """Replay, snapshot, replay again: ledger and event are exactly as after the first."""
    row, po, seller = failed_event_of_unknown_payout("payout.failed", "failed", transactions=3)
    payout = make_payout(seller, stripe_payout_id=po, status="paid", transactions=3)

    first = event_replay(event_id=row.pk, requested_by=staff)
    row.refresh_from_db()
    after_one = ledger_state(payout), (row.status, row.status_reason, row.processed_at)
    second = event_replay(event_id=row.pk, requested_by=staff)
    row.refresh_from_db()
    after_two = ledger_state(payout), (row.status, row.status_reason, row.processed_at)

    assert first.kind == Outcome.APPLIED
    assert second == ProcessingOutcome(Outcome.SKIPPED, "already applied", None, "processed")
    assert after_two == after_one
    ledger, _ = after_one
    assert ledger["payout"]["status"] == "failed"
    assert ledger["payout"]["events_applied"] == 1
    assert all(not payed_out and released is None for _, payed_out, released in ledger["txns"])
