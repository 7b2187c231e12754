"""Inline processing never makes Stripe wait on a lock: it hands the event to the workers."""

import pytest

from payouts import stripe_events
from payouts.models import Payout, WebhookEvent, WebhookEventAttempt
from tests.dbsessions import Session
from tests.factories import make_payout
from tests.payouts.helpers import deliver, run_worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_locked_payout_is_answered_at_once_and_left_to_the_workers(inline_server, worker_env):
    """The answer arrives while another transaction still holds the payout's row lock."""
    payout = make_payout(status="in_transit")
    holder = Session("read committed", name="lock-holder")
    holder.run("SELECT id FROM payouts_payout WHERE id = %s FOR UPDATE", [payout.pk])
    try:
        event = stripe_events.payout_event(
            "payout.paid", stripe_events.payout_object(payout.stripe_payout_id,
                                                       amount=payout.amount, status="paid"),
            account=payout.seller.stripe_account_id)
        answer = deliver(inline_server.url, event)  # returns with the lock still held
        assert answer.status == 200
        assert answer.json()["status"] == "received"
    finally:
        holder.rollback()
    stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
    attempt = WebhookEventAttempt.objects.get(event=stored)
    assert attempt.outcome == "retry" and "55P03" in attempt.reason
    assert stored.next_attempt_at is not None

    # Once the lock is gone, a worker applies it.
    for _ in range(50):  # bounded: the postponement is at most 2 s
        run_worker(worker_env, "--once")
        stored.refresh_from_db()
        if stored.status == "processed":
            break
    assert stored.status == "processed"
    assert Payout.objects.get(pk=payout.pk).status == "paid"
