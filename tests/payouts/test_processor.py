"""The payout processor against a real PostgreSQL: ledger effects, ordering, retries, records."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
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
from payouts.services import inbox
from payouts.services.ledger import update_payout_from_webhook
from payouts.services.outcome import Outcome, ProcessingOutcome
from payouts.services.processing import event_process, event_receive
from tests.factories import make_payout, make_seller
from tests.payouts.helpers import ledger_state, payout_event, run_together

pytestmark = pytest.mark.django_db(transaction=True)

T0 = int(time.time()) - 3600  # the Stripe `created` every event of a test is relative to
TXN_TABLE = PaymentTransaction._meta.db_table


# --- helpers ----------------------------------------------------------------------------


def payout_evt(event_type: str, payout_id: str, status: str, *, at: int = 0,
               account: str | None = None, **fields: Any) -> dict[str, Any]:
    """A Stripe payout event created ``at`` seconds after T0, agreeing with our payout."""
    return payout_event(event_type, payout_id, status, created=T0 + at, object_created=T0,
                        account=account, **fields)


def failed_evt(payout_id: str, *, at: int = 0, **fields: Any) -> dict[str, Any]:
    return payout_evt("payout.failed", payout_id, "failed", at=at, **fields)


def store(event: dict[str, Any]) -> WebhookEvent:
    """Store an event as the webhook endpoint does (inline mode: leased, attempts 1)."""
    recorded = inbox.event_record(event, stripe_events.encode(event), {}, lease_s=60)
    assert recorded.event_id is not None
    return WebhookEvent.objects.get(pk=recorded.event_id)


def process(row: WebhookEvent, trigger: str = "inline") -> ProcessingOutcome:
    return event_process(event_id=row.pk, trigger=trigger)


def deliver(event: dict[str, Any], trigger: str = "inline") -> tuple[WebhookEvent,
                                                                       ProcessingOutcome]:
    """Store and process an event; return its refreshed row and the outcome."""
    row = store(event)
    outcome = process(row, trigger)
    row.refresh_from_db()
    return row, outcome


def receive(event: dict[str, Any]) -> tuple[WebhookEvent, ProcessingOutcome]:
    """Receive an event as the endpoint does in inline mode: stored and applied at once."""
    received = event_receive(event, stripe_events.encode(event), {})
    assert received.event_id is not None and received.outcome is not None
    return WebhookEvent.objects.get(pk=received.event_id), received.outcome


def txns_of(payout: Payout) -> list[PaymentTransaction]:
    return list(PaymentTransaction.objects.filter(transfers__payout_items__payout=payout)
                .order_by("id"))


def transfers_of(payout: Payout) -> list[PaymentTransfer]:
    return list(PaymentTransfer.objects.filter(payout_items__payout=payout).order_by("id"))


def new_payout_id() -> str:
    return stripe_events.new_id("po")


def xmin(model: Any, pk: int) -> str:
    """The id of the transaction that wrote the row's current version."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT xmin::text FROM {model._meta.db_table} WHERE id = %s", [pk])
        return str(cursor.fetchone()[0])


# --- paid, failed, in order and out of order ---------------------------------------------


def test_paid_then_failed_releases_every_transaction_of_the_payout():
    """paid → failed: status, failure code/message, all its transactions released, transfers
    failed; another payout of the same seller is untouched."""
    seller = make_seller()
    payout = make_payout(seller, status="in_transit", transactions=4)
    other = make_payout(seller, status="in_transit", transactions=3)
    other_before = ledger_state(other)
    po = payout.stripe_payout_id

    _, paid = deliver(payout_evt("payout.paid", po, "paid", at=10))
    assert paid.kind == Outcome.APPLIED
    assert {t.status for t in transfers_of(payout)} == {"paid"}

    row, outcome = deliver(failed_evt(po, at=20))

    assert outcome == ProcessingOutcome(Outcome.APPLIED, "paid → failed", payout.pk, "processed")
    assert row.status == WebhookEvent.Status.PROCESSED
    payout.refresh_from_db()
    assert payout.status == "failed"
    assert payout.failure_code == "account_closed"
    assert payout.failure_message == "The bank account has been closed."
    assert payout.last_event_id == row.stripe_event_id
    txns = txns_of(payout)
    assert len(txns) == 4
    assert all(t.payed_out is False and t.actual_release_date is None for t in txns)
    assert [t.status for t in transfers_of(payout)] == ["failed"] * 4
    assert ledger_state(other) == other_before
    assert all(t.payed_out and t.actual_release_date is not None for t in txns_of(other))


def test_an_unknown_failure_code_is_kept_as_sent():
    """Stripe's failure codes are an open set: a code we never heard of is stored verbatim."""
    payout = make_payout(status="paid", transactions=2)
    _, outcome = deliver(failed_evt(payout.stripe_payout_id, failure_code="brand_new_code",
                                    failure_message="Something new went wrong."))
    assert outcome.kind == Outcome.APPLIED
    payout.refresh_from_db()
    assert (payout.status, payout.failure_code, payout.failure_message) == (
        "failed", "brand_new_code", "Something new went wrong.")
    assert all(not t.payed_out and t.actual_release_date is None for t in txns_of(payout))


def test_in_transit_then_paid_marks_transfers_paid_and_sets_arrival():
    """in_transit → paid: transfers paid, transactions stay paid out, arrival date from Stripe."""
    payout = make_payout(status="in_transit", transactions=3)
    released = [(t.pk, t.actual_release_date) for t in txns_of(payout)]
    arrival = T0 + 3 * 86400

    row, outcome = deliver(payout_evt("payout.paid", payout.stripe_payout_id, "paid", at=5,
                                      arrival_date=arrival))

    assert outcome == ProcessingOutcome(Outcome.APPLIED, "in_transit → paid", payout.pk,
                                        "processed")
    payout.refresh_from_db()
    assert payout.status == "paid"
    assert payout.arrival_date == datetime.fromtimestamp(arrival, tz=UTC)
    assert payout.failure_code == "" and payout.failure_message == ""
    assert payout.events_applied == 1
    assert payout.last_event_created == row.stripe_created
    assert [t.status for t in transfers_of(payout)] == ["paid"] * 3
    txns = txns_of(payout)
    assert all(t.payed_out for t in txns)
    assert [(t.pk, t.actual_release_date) for t in txns] == released


@pytest.mark.parametrize(("paid_at", "reason_start"), [
    (30, "payout is failed, a final status"),
    (5, "older than the newest applied event"),
])
def test_a_late_paid_after_failed_is_skipped(paid_at, reason_start):
    """failed, then payout.paid (created later or earlier): the payout stays failed."""
    payout = make_payout(status="in_transit", transactions=2)
    po = payout.stripe_payout_id
    failed_row, _ = deliver(failed_evt(po, at=20))
    before = ledger_state(payout)

    row, outcome = deliver(payout_evt("payout.paid", po, "paid", at=paid_at))

    assert outcome.kind == Outcome.SKIPPED
    assert outcome.reason.startswith(reason_start)
    if paid_at < 20:
        assert failed_row.stripe_event_id in outcome.reason
    assert row.status == WebhookEvent.Status.SKIPPED
    assert row.status_reason == outcome.reason
    assert ledger_state(payout) == before
    assert before["payout"]["status"] == "failed"


def test_an_old_payout_updated_after_paid_is_skipped():
    """A payout.updated (in_transit) created before the applied payout.paid changes nothing."""
    payout = make_payout(status="pending", transactions=2)
    po = payout.stripe_payout_id
    paid_row, _ = deliver(payout_evt("payout.paid", po, "paid", at=20))
    before = ledger_state(payout)

    row, outcome = deliver(payout_evt("payout.updated", po, "in_transit", at=10))

    assert outcome.kind == Outcome.SKIPPED
    assert outcome.reason == f"older than the newest applied event {paid_row.stripe_event_id}"
    assert row.status == WebhookEvent.Status.SKIPPED
    assert ledger_state(payout) == before
    assert before["payout"]["status"] == "paid"


# --- payouts we do not know yet -------------------------------------------------------------


def test_paid_for_an_unknown_payout_waits_then_applies_once_it_exists():
    """payout.paid before its payout exists: retry with backoff; once created, applied once."""
    po, seller = new_payout_id(), make_seller()
    row, outcome = deliver(payout_evt("payout.paid", po, "paid", at=10,
                                      account=seller.stripe_account_id, amount=2000))

    assert outcome.kind == Outcome.RETRY
    assert outcome.status_after == WebhookEvent.Status.FAILED
    assert po in outcome.reason
    assert row.status == WebhookEvent.Status.FAILED
    assert row.next_attempt_at is not None and row.next_attempt_at > timezone.now()
    assert row.attempts == 1
    assert po in row.last_error
    assert list(row.attempts_log.values_list("outcome", flat=True)) == ["retry"]
    assert not Payout.objects.filter(stripe_payout_id=po).exists()

    payout = make_payout(seller, stripe_payout_id=po, status="in_transit", transactions=2)
    outcome = process(row, trigger="worker")
    assert outcome == ProcessingOutcome(Outcome.APPLIED, "in_transit → paid", payout.pk,
                                        "processed")
    again = process(row, trigger="worker")
    assert again.kind == Outcome.SKIPPED

    payout.refresh_from_db()
    row.refresh_from_db()
    assert payout.status == "paid"
    assert payout.events_applied == 1
    assert payout.last_event_id == row.stripe_event_id
    assert row.status == WebhookEvent.Status.PROCESSED
    assert row.next_attempt_at is None
    assert list(row.attempts_log.values_list("trigger", "outcome")) == [
        ("inline", "retry"), ("worker", "applied"), ("worker", "skipped")]


def test_payout_created_for_a_known_seller_creates_the_payout():
    """payout.created on a known seller's connected account creates the payout for that seller."""
    seller = make_seller()
    po = new_payout_id()
    row, outcome = deliver(payout_evt("payout.created", po, "pending", at=1,
                                      account=seller.stripe_account_id, amount=4321,
                                      currency="eur", metadata={"run": "42"}))

    assert outcome.kind == Outcome.APPLIED and outcome.reason == "created"
    payout = Payout.objects.get(stripe_payout_id=po)
    assert outcome.payout_id == payout.pk
    assert payout.seller == seller
    assert (payout.status, payout.amount, payout.currency) == ("pending", 4321, "eur")
    assert payout.metadata == {"run": "42"}
    assert payout.last_event_id == row.stripe_event_id
    assert payout.last_event_created == row.stripe_created
    assert payout.events_applied == 1
    assert row.status == WebhookEvent.Status.PROCESSED


def test_payout_created_for_an_unknown_account_waits():
    """payout.created on an account with no seller yet: retried later, nothing created."""
    po = new_payout_id()
    row, outcome = deliver(payout_evt("payout.created", po, "pending",
                                      account="acct_notknownyet0001"))
    assert outcome.kind == Outcome.RETRY
    assert "acct_notknownyet0001" in outcome.reason
    assert row.status == WebhookEvent.Status.FAILED
    assert row.next_attempt_at is not None and row.next_attempt_at > timezone.now()
    assert not Payout.objects.filter(stripe_payout_id=po).exists()


def test_payout_created_without_account_is_a_platform_payout():
    """payout.created with no account (the platform's own payout) creates it with no seller."""
    po = new_payout_id()
    row, outcome = deliver(payout_evt("payout.created", po, "pending"))
    assert outcome.kind == Outcome.APPLIED
    payout = Payout.objects.get(stripe_payout_id=po)
    assert payout.seller is None
    assert payout.status == "pending"
    assert row.status == WebhookEvent.Status.PROCESSED


# --- idempotency ----------------------------------------------------------------------------


def test_processing_the_same_event_twice_changes_nothing_the_second_time():
    """event_process run twice for one event: the second run is 'already applied', no effect."""
    payout = make_payout(status="paid", transactions=3)
    row = store(failed_evt(payout.stripe_payout_id, at=10))
    first = process(row)
    after_first = ledger_state(payout)

    second = process(row, trigger="worker")

    assert first.kind == Outcome.APPLIED
    assert second == ProcessingOutcome(Outcome.SKIPPED, "already applied", None, "processed")
    assert ledger_state(payout) == after_first
    assert after_first["payout"]["events_applied"] == 1
    row.refresh_from_db()
    assert row.status == WebhookEvent.Status.PROCESSED


def test_update_payout_from_webhook_twice_changes_nothing_the_second_time():
    """The ledger update called twice directly with one event: applied, then 'already applied'."""
    payout = make_payout(status="in_transit", transactions=3)
    event = payout_evt("payout.paid", payout.stripe_payout_id, "paid", at=10)
    row = store(event)
    obj = event["data"]["object"]

    first = update_payout_from_webhook(row, obj)
    after_first = ledger_state(payout)
    second = update_payout_from_webhook(row, obj)

    assert first == ProcessingOutcome(Outcome.APPLIED, "in_transit → paid", payout.pk)
    assert second == ProcessingOutcome(Outcome.SKIPPED, "already applied", payout.pk)
    assert ledger_state(payout) == after_first
    assert after_first["payout"]["events_applied"] == 1
    assert after_first["payout"]["status"] == "paid"
    logs = TransactionLog.objects.filter(operation="payout.apply_event")
    assert [(log.isolation_level, log.outcome, log.payout_id) for log in logs] == [
        ("serializable", "committed", payout.pk)] * 2


# --- events we do not act on ----------------------------------------------------------------


@pytest.mark.parametrize("event_type", ["payout.reconciliation_completed", "charge.succeeded"])
def test_unhandled_event_types_are_ignored(event_type):
    """Types the processor does not handle are stored as ignored and touch no payout."""
    payout = make_payout(status="in_transit", transactions=1)
    before = ledger_state(payout)
    if event_type == "charge.succeeded":
        charge = {"id": stripe_events.new_id("ch"), "object": "charge", "amount": 500,
                  "status": "succeeded", "livemode": False}
        event = stripe_events.payout_event(event_type, charge, created=T0)
    else:
        event = payout_evt(event_type, payout.stripe_payout_id, "paid", at=10)

    row, outcome = deliver(event)

    assert outcome == ProcessingOutcome(Outcome.IGNORED, f"{event_type} is not handled", None,
                                        "ignored")
    assert row.status == WebhookEvent.Status.IGNORED
    assert row.status_reason == f"{event_type} is not handled"
    assert ledger_state(payout) == before


def test_a_livemode_event_on_a_test_deployment_is_ignored(settings):
    """A live-mode event reaching the (default) test-mode deployment is ignored, with why."""
    assert settings.STRIPE_LIVEMODE is False
    payout = make_payout(status="in_transit", transactions=1)
    before = ledger_state(payout)
    event = payout_evt("payout.paid", payout.stripe_payout_id, "paid", at=10, livemode=True)
    assert event["livemode"] is True

    row, outcome = deliver(event)

    assert outcome.kind == Outcome.IGNORED
    assert outcome.reason == "livemode=True on a test deployment"
    assert row.status == WebhookEvent.Status.IGNORED
    assert ledger_state(payout) == before


# --- records: transaction log and attempts -----------------------------------------------


@pytest.mark.parametrize("path", ["stored", "inline"])
@pytest.mark.parametrize("case", ["applied", "skipped", "retry", "ignored", "created"])
def test_every_processing_writes_one_transaction_log_and_one_attempt(case, path):
    """Each run: one serializable, committed TransactionLog row for the event (and payout when
    known) and one WebhookEventAttempt with the outcome, whether the event was stored first
    (workers, replays) or is stored by the same transaction (inline)."""
    payout = make_payout(status="in_transit", transactions=2)
    po = payout.stripe_payout_id
    if case == "skipped":
        deliver(failed_evt(po, at=50))
    TransactionLog.objects.all().delete()
    event, expected_kind, expected_payout = {
        "applied": (payout_evt("payout.paid", po, "paid", at=10), Outcome.APPLIED, payout.pk),
        "skipped": (payout_evt("payout.paid", po, "paid", at=10), Outcome.SKIPPED, payout.pk),
        "retry": (payout_evt("payout.paid", new_payout_id(), "paid"), Outcome.RETRY, None),
        "ignored": (payout_evt("payout.reconciliation_completed", po, "paid"), Outcome.IGNORED,
                    None),
        "created": (payout_evt("payout.created", new_payout_id(), "pending"), Outcome.APPLIED,
                    "new"),
    }[case]

    row, outcome = deliver(event) if path == "stored" else receive(event)

    assert outcome.kind == expected_kind
    assert outcome.status_after == row.status and row.attempts == 1
    [log] = TransactionLog.objects.all()
    assert log.operation == "webhook.process_event"
    assert log.isolation_level == "serializable"
    assert log.outcome == "committed"
    assert log.attempts == 1 + len(log.sqlstates)
    assert log.event_id == row.pk
    # Written by the transaction it describes (one commit per delivery): inline, that
    # transaction stored the event; for a stored event, it settled the event's status.
    assert xmin(TransactionLog, log.pk) == xmin(WebhookEvent, row.pk)
    if expected_payout == "new":
        assert log.payout_id == Payout.objects.get(stripe_payout_id=row.stripe_object_id).pk
    else:
        assert log.payout_id == expected_payout
    [attempt] = row.attempts_log.all()
    assert attempt.trigger == "inline"
    assert attempt.outcome == expected_kind
    assert attempt.reason == outcome.reason
    assert attempt.status_after == row.status
    assert attempt.error == "" and attempt.requested_by is None
    assert attempt.started_at <= attempt.finished_at


def test_deleting_an_event_deletes_its_attempts():
    """Attempts keep no database constraint on their event (see the model); Django's
    cascade still removes them with it."""
    payout = make_payout(status="in_transit", transactions=1)
    row, _ = receive(payout_evt("payout.paid", payout.stripe_payout_id, "paid", at=10))
    process(row, trigger="worker")
    assert row.attempts_log.count() == 2

    WebhookEvent.objects.filter(pk=row.pk).delete()

    assert not WebhookEventAttempt.objects.filter(event_id=row.pk).exists()


@pytest.mark.parametrize("status", ["failed", "canceled"])
def test_the_release_is_one_update_statement_for_fifty_transactions(status):
    """paid → failed (or canceled: the money comes back just the same) resets all 50
    transactions with ONE UPDATE, not one per transaction, in the status's statement."""
    payout = make_payout(status="paid" if status == "failed" else "in_transit", transactions=50)
    event = payout_evt(f"payout.{status}", payout.stripe_payout_id, status, at=10)
    row = store(event)

    with CaptureQueriesContext(connection) as queries:
        outcome = update_payout_from_webhook(row, event["data"]["object"])

    assert outcome.kind == Outcome.APPLIED
    statements = [" ".join(q["sql"].split()) for q in queries.captured_queries]
    txn_updates = [sql for sql in statements if f"UPDATE {TXN_TABLE} SET" in sql]
    assert len(txn_updates) == 1, statements
    # One writing statement for the payout, its transfers and its transactions.
    assert sum(bool(re.search(r"UPDATE \S+ SET", sql)) for sql in statements) == 1, statements
    txns = txns_of(payout)
    assert len(txns) == 50
    assert all(not t.payed_out and t.actual_release_date is None for t in txns)


# --- retries ---------------------------------------------------------------------------------


def test_a_waiting_event_with_attempts_used_up_stays_failed_within_the_horizon(settings):
    """WEBHOOK_MAX_ATTEMPTS=2 used up, but received less than 72 h ago: Stripe may still
    deliver what it waits for, so it is retried, not dead."""
    settings.WEBHOOK_MAX_ATTEMPTS = 2
    row = store(payout_evt("payout.paid", new_payout_id(), "paid"))
    WebhookEvent.objects.filter(pk=row.pk).update(
        attempts=5, received_at=timezone.now() - timedelta(hours=71))

    outcome = process(row, trigger="worker")

    row.refresh_from_db()
    assert (outcome.kind, outcome.status_after) == (Outcome.RETRY, WebhookEvent.Status.FAILED)
    assert row.next_attempt_at is not None and row.next_attempt_at > timezone.now()


def test_a_waiting_event_past_the_horizon_with_attempts_used_up_is_dead(settings):
    """Attempts used up and received more than WEBHOOK_RETRY_HORIZON_HOURS (72) ago: dead."""
    settings.WEBHOOK_MAX_ATTEMPTS = 2
    row = store(payout_evt("payout.paid", new_payout_id(), "paid"))
    WebhookEvent.objects.filter(pk=row.pk).update(
        attempts=2, received_at=timezone.now() - timedelta(hours=72, minutes=1))

    outcome = process(row, trigger="worker")

    row.refresh_from_db()
    assert outcome.kind == Outcome.RETRY
    assert outcome.status_after == WebhookEvent.Status.DEAD
    assert row.status == WebhookEvent.Status.DEAD
    assert row.next_attempt_at is None
    assert "is not known yet" in row.last_error
    assert row.attempts_log.get().status_after == "dead"


def test_past_the_horizon_an_event_still_gets_its_attempts(settings):
    """Received long ago but with attempts left (e.g. a low backoff cap): retried."""
    settings.WEBHOOK_MAX_ATTEMPTS = 10
    row = store(payout_evt("payout.paid", new_payout_id(), "paid"))
    WebhookEvent.objects.filter(pk=row.pk).update(
        attempts=3, received_at=timezone.now() - timedelta(days=5))

    outcome = process(row, trigger="worker")

    assert outcome.status_after == WebhookEvent.Status.FAILED


def test_a_retry_with_attempts_left_stays_failed(settings):
    """With attempts left (1 of 2 used), a retry outcome schedules the event again."""
    settings.WEBHOOK_MAX_ATTEMPTS = 2
    row, outcome = deliver(payout_evt("payout.paid", new_payout_id(), "paid"))
    assert row.attempts == 1
    assert outcome.status_after == row.status == WebhookEvent.Status.FAILED
    assert row.next_attempt_at is not None and row.next_attempt_at > timezone.now()


# --- concurrency -------------------------------------------------------------------------


def test_two_events_of_one_payout_processed_at_once_end_at_the_newest():
    """payout.paid and a newer payout.failed processed by two threads at once (5 rounds):
    no exception, consistent statuses, payout at the newest event, retries logged."""
    for round_no in range(5):
        payout = make_payout(status="in_transit", transactions=3)
        po = payout.stripe_payout_id
        paid_row = store(payout_evt("payout.paid", po, "paid", at=10))
        failed_row = store(failed_evt(po, at=20))

        paid, failed = run_together(
            lambda row=paid_row: event_process(event_id=row.pk, trigger="worker",
                                               worker="thread-paid"),
            lambda row=failed_row: event_process(event_id=row.pk, trigger="worker",
                                                 worker="thread-failed"),
        )

        assert isinstance(paid, ProcessingOutcome), f"round {round_no}: {paid!r}"
        assert isinstance(failed, ProcessingOutcome), f"round {round_no}: {failed!r}"
        # The newest event always applies; the older one applies only if it went first.
        assert failed.kind == Outcome.APPLIED, failed
        assert paid.kind in (Outcome.APPLIED, Outcome.SKIPPED), paid
        paid_row.refresh_from_db()
        failed_row.refresh_from_db()
        assert failed_row.status == WebhookEvent.Status.PROCESSED
        if paid.kind == Outcome.SKIPPED:
            assert paid.reason == ("older than the newest applied event "
                                   f"{failed_row.stripe_event_id}")
            assert paid_row.status == WebhookEvent.Status.SKIPPED
        else:
            assert paid_row.status == WebhookEvent.Status.PROCESSED

        payout.refresh_from_db()
        assert payout.status == "failed"
        assert payout.last_event_id == failed_row.stripe_event_id
        assert payout.last_event_created == failed_row.stripe_created
        assert payout.failure_code == "account_closed"
        assert payout.events_applied == (2 if paid.kind == Outcome.APPLIED else 1)
        assert all(not t.payed_out and t.actual_release_date is None for t in txns_of(payout))
        assert [t.status for t in transfers_of(payout)] == ["failed"] * 3

        for row in (paid_row, failed_row):
            [log] = TransactionLog.objects.filter(event=row)
            assert log.outcome == "committed" and log.isolation_level == "serializable"
            # A 40001 here (likely, not guaranteed) was retried whole, and is on record.
            assert log.attempts == 1 + len(log.sqlstates)
            assert set(log.sqlstates) <= {"40001", "40P01"}
            assert list(row.attempts_log.values_list("outcome", flat=True)) == [
                "applied" if row is failed_row or paid.kind == Outcome.APPLIED else "skipped"]
