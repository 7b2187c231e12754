"""When an event is tried again or given up: one policy (``inbox.retry_at``) for inline
processing, workers, and attempts abandoned by a worker that died."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from payouts import stripe_events
from payouts.models import WebhookEvent
from payouts.services import inbox
from tests.payouts.helpers import payout_event

pytestmark = pytest.mark.django_db(transaction=True)

NOW = timezone.now()


@pytest.mark.parametrize(("attempts", "age_h", "gives_up"), [
    (1, 0, False),
    (10, 71.9, False),  # attempts used up, but Stripe may still deliver what it waits for
    (3, 100, False),  # past the horizon, attempts left
    (10, 72, True),
    (25, 80, True),
])
def test_given_up_only_with_attempts_used_up_and_the_horizon_passed(
        settings, attempts, age_h, gives_up):
    settings.WEBHOOK_MAX_ATTEMPTS, settings.WEBHOOK_RETRY_HORIZON_HOURS = 10, 72
    when = inbox.retry_at(attempts=attempts, received_at=NOW - timedelta(hours=age_h), now=NOW)
    assert (when is None) is gives_up
    if when is not None:
        assert NOW < when <= NOW + timedelta(seconds=settings.WEBHOOK_RETRY_MAX_SECONDS)


def test_the_backoff_doubles_with_jitter_and_is_capped(settings):
    settings.WEBHOOK_RETRY_BASE_SECONDS, settings.WEBHOOK_RETRY_MAX_SECONDS = 30, 600
    for attempts, ceiling in [(1, 30), (2, 60), (3, 120), (5, 480), (6, 600), (20, 600)]:
        delays = {inbox.retry_delay(attempts).total_seconds() for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempts, delays)
        assert len(delays) > 1  # jitter


def waiting_event(**changes: object) -> WebhookEvent:
    """A stored event for a payout nobody knows (it waits), claimed by a worker."""
    event = payout_event("payout.paid", stripe_events.new_id("po"), created=int(NOW.timestamp()))
    recorded = inbox.event_record(event, stripe_events.encode(event), {}, lease_s=0)
    assert recorded.event_id is not None
    assert inbox.claim_due(worker="host:4242", limit=1) == [recorded.event_id]
    WebhookEvent.objects.filter(pk=recorded.event_id).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1), **changes)  # lease ran out
    return WebhookEvent.objects.get(pk=recorded.event_id)


def test_an_abandoned_attempt_is_on_the_timeline_and_retried_by_the_policy():
    event = waiting_event()
    assert (event.attempts, event.claimed_by) == (1, "host:4242")
    assert inbox.claim_due(worker="other:1", limit=1) == []  # not before it is settled

    assert inbox.settle_abandoned() == 1

    event.refresh_from_db()
    assert (event.status, event.claimed_by) == ("failed", "")
    assert event.next_attempt_at > timezone.now()
    assert "attempt 1 by host:4242 stopped before it finished" in event.last_error
    [attempt] = event.attempts_log.all()
    assert (attempt.trigger, attempt.outcome, attempt.status_after) == (
        "abandoned", "failed", "failed")
    assert inbox.settle_abandoned() == 0


def test_an_abandoned_attempt_past_the_horizon_with_attempts_used_up_is_dead(settings):
    settings.WEBHOOK_MAX_ATTEMPTS = 3
    event = waiting_event(attempts=3, received_at=timezone.now() - timedelta(hours=73))
    inbox.settle_abandoned()
    event.refresh_from_db()
    assert (event.status, event.next_attempt_at) == ("dead", None)
    assert event.attempts_log.get().status_after == "dead"


def test_an_attempt_still_within_its_lease_is_not_abandoned():
    event = waiting_event()
    WebhookEvent.objects.filter(pk=event.pk).update(
        next_attempt_at=timezone.now() + timedelta(minutes=1))
    assert inbox.settle_abandoned() == 0
