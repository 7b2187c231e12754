"""Replay previews: the real processor, rolled back, writing nothing at all."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection

from payouts import stripe_events
from payouts.models import WebhookEvent
from payouts.services import inbox
from payouts.services.outcome import Outcome
from payouts.services.preview import event_preview
from payouts.services.processing import event_process, event_replay
from tests.factories import make_payout, make_seller
from tests.payouts.helpers import ledger_state, payout_event

pytestmark = pytest.mark.django_db(transaction=True)  # the preview opens its own transaction

T0 = int(time.time()) - 3600
EVENT_FIELDS = ("status", "status_reason", "attempts", "next_attempt_at", "claimed_by",
                "last_error", "processed_at")


def store(event: dict[str, Any]) -> WebhookEvent:
    recorded = inbox.event_record(event, stripe_events.encode(event), {}, lease_s=0)
    assert recorded.event_id is not None
    return WebhookEvent.objects.get(pk=recorded.event_id)


def every_payouts_table() -> dict[str, int]:
    """The number of rows of every table of the payouts app."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'payouts\\_%%'")
        tables = sorted(row[0] for row in cursor.fetchall())
        counts = {}
        for table in tables:
            cursor.execute(f'SELECT count(*) FROM "{table}"')
            counts[table] = cursor.fetchone()[0]
    assert "payouts_transactionlog" in counts and "payouts_webhookeventattempt" in counts
    return counts


def event_fields(row: WebhookEvent) -> tuple[Any, ...]:
    row.refresh_from_db()
    return tuple(getattr(row, field) for field in EVENT_FIELDS)


def test_a_preview_of_a_failure_reports_the_release_and_writes_nothing():
    payout = make_payout(status="in_transit", transactions=3, amount_each=1250)
    row = store(payout_event("payout.failed", payout.stripe_payout_id, "failed", created=T0))
    tables, fields, ledger = every_payouts_table(), event_fields(row), ledger_state(payout)

    [preview] = event_preview([row.pk])

    assert (preview.kind, preview.status_after) == (Outcome.APPLIED, "processed")
    assert preview.reason == "in_transit → failed"
    [change] = preview.changes
    assert (change.stripe_payout_id, change.status_from, change.status_to) == (
        payout.stripe_payout_id, "in_transit", "failed")
    assert (change.released_count, change.released_amount, change.currency) == (3, 3750, "usd")
    assert change.transfers_moved == (("pending", "failed", 3),)
    # Nothing at all was written: no row anywhere (no attempt, no transaction log, no
    # audit entry), the event and the ledger as they were.
    assert every_payouts_table() == tables
    assert event_fields(row) == fields
    assert ledger_state(payout) == ledger

    # The replay itself does what the preview said.
    staff = User.objects.create_user("support", password="x" * 12)
    assert event_replay(event_id=row.pk, requested_by=staff).kind == Outcome.APPLIED
    after = ledger_state(payout)
    assert [paid for _, paid, _ in after["txns"]] == [False, False, False]
    assert [status for _, status in after["transfers"]] == ["failed"] * 3


def test_a_preview_says_why_an_event_would_be_held_skipped_or_wait():
    payout = make_payout(status="in_transit", transactions=2)
    held = store(payout_event("payout.paid", payout.stripe_payout_id, "paid", created=T0,
                              amount=1))
    applied = store(payout_event("payout.paid", payout.stripe_payout_id, "paid",
                                 created=T0 + 5))
    assert event_process(event_id=applied.pk, trigger="inline").kind == Outcome.APPLIED
    seller = make_seller()
    unknown = store(payout_event("payout.paid", stripe_events.new_id("po"), "paid",
                                 created=T0, account=seller.stripe_account_id))
    tables = every_payouts_table()

    by_id = {p.event_id: p for p in event_preview([held.pk, applied.pk, unknown.pk, 10**9])}

    assert set(by_id) == {held.pk, applied.pk, unknown.pk}  # an unknown id is left out
    assert by_id[held.pk].kind == Outcome.HELD and "amount" in by_id[held.pk].reason
    assert by_id[applied.pk].kind == Outcome.SKIPPED
    assert by_id[applied.pk].reason == "already applied"
    # A payout we lack: the preview says it waits, without asking Stripe for it.
    assert by_id[unknown.pk].kind == Outcome.RETRY and "not known yet" in by_id[unknown.pk].reason
    assert all(not p.changes for p in by_id.values())
    assert every_payouts_table() == tables
