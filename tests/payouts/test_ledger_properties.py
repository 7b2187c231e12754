"""Property: whatever Stripe does to the order of its deliveries, the ledger ends right.

Hypothesis draws a few payouts, each with a lifecycle Stripe could report (pending →
in transit → paid, maybe failed; or canceled), maybe a reversal of a paid payout
(paid, failed or canceled), maybe a same-second twin of its last event, maybe an
event from another seller's account. All their events are then delivered shuffled,
some twice, some at the same moment from several threads, each through the inline
path or stored for a worker; some are replayed by staff afterwards; what waits is
processed as the workers would. Then the ledger must match a simple model, and
``check_ledger``'s invariants must hold.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.contrib.auth.models import User
from hypothesis import given
from hypothesis import strategies as st

from payouts import stripe_events
from payouts.invariants import ledger_violations
from payouts.models import PaymentTransaction, PaymentTransfer, Payout, WebhookEvent
from payouts.services import inbox
from payouts.services.processing import event_process, event_receive, event_replay
from tests.factories import make_payout, make_seller
from tests.payouts.helpers import drain, payout_event, run_together

pytestmark = pytest.mark.django_db(transaction=True)

LIFECYCLES = [
    ["pending", "in_transit", "paid"],
    ["pending", "in_transit", "paid", "failed"],
    ["pending", "paid"],
    ["pending", "in_transit", "failed"],
    ["pending", "canceled"],
    ["pending", "in_transit", "canceled"],
]
TYPE_OF = {"pending": "payout.created", "in_transit": "payout.updated", "paid": "payout.paid",
           "failed": "payout.failed", "canceled": "payout.canceled"}
SETTLED = {"processed", "skipped", "held"}


@dataclass
class Story:
    payout: Payout
    lifecycle: list[str]
    reversal: str | None  # the reversal's end, if the payout is reversed
    events: list[dict[str, Any]] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # ids of events that must be held
    reversal_id: str = ""

    @property
    def reversed(self) -> bool:
        return self.reversal == "paid"

    @property
    def money_back(self) -> bool:
        return self.lifecycle[-1] in ("failed", "canceled") or self.reversed


story_specs = st.lists(st.fixed_dictionaries({
    "lifecycle": st.sampled_from(LIFECYCLES),
    "reversal": st.sampled_from([None, "paid", "failed", "canceled"]),
    "twin": st.booleans(),
    "foreign": st.booleans(),
}), min_size=1, max_size=3)


def build(spec: dict[str, Any], t0: int) -> Story:
    payout = make_payout(status="pending", transactions=2)
    po, account = str(payout.stripe_payout_id), payout.seller.stripe_account_id
    lifecycle = spec["lifecycle"]
    reversal = spec["reversal"] if lifecycle[-1] == "paid" else None
    story = Story(payout, lifecycle, reversal)
    for n, status in enumerate(lifecycle):
        story.events.append(payout_event(TYPE_OF[status], po, status, created=t0 + 10 * n,
                                         object_created=t0))
    last = t0 + 10 * (len(lifecycle) - 1)
    if spec["twin"]:  # the same status in the same second, another event
        story.events.append(payout_event("payout.updated", po, lifecycle[-1], created=last,
                                         object_created=t0))
    if spec["foreign"]:  # another seller's account names our payout: held, whenever it comes
        foreign = payout_event("payout.failed", po, created=t0 + 5, object_created=t0,
                               account=make_seller().stripe_account_id)
        story.events.append(foreign)
        story.held.append(foreign["id"])
    if reversal:
        story.reversal_id = stripe_events.new_id("po")
        story.events.append(payout_event("payout.updated", po, "paid", created=last + 100,
                                         object_created=t0, reversed_by=story.reversal_id))
        for n, status in enumerate(["pending", "in_transit", reversal]):
            story.events.append(payout_event(
                TYPE_OF[status], story.reversal_id, status, created=last + 200 + 10 * n,
                object_created=last + 200, account=account, amount=-payout.amount,
                original_payout=po))
    return story


def deliver(event: dict[str, Any], stored_first: bool) -> None:
    """As the endpoint does: inline (store and apply at once), or stored for a worker."""
    body = stripe_events.encode(event)
    if not stored_first:
        event_receive(event, body, {})
        return
    recorded = inbox.event_record(event, body, {}, lease_s=0)
    if recorded.event_id is not None:
        event_process(event_id=recorded.event_id, trigger="worker")


def together(jobs: list[Any]) -> None:
    """Run the jobs at the same moment, each in its own thread with its own connection."""
    if len(jobs) == 1:
        jobs[0]()
        return
    failures = [r for r in run_together(*jobs) if isinstance(r, BaseException)]
    assert not failures, failures


def check(stories: list[Story]) -> None:
    """The model: each payout at its lifecycle's last status, reversed when its reversal
    was paid, its money back exactly when Stripe gave it back; every event settled and
    applied at most once; the ledger's invariants hold."""
    events = {e["id"]: e for story in stories for e in story.events}
    rows = {row.stripe_event_id: row for row in
            WebhookEvent.objects.filter(stripe_event_id__in=list(events))}
    assert set(rows) == set(events), "an event was lost"
    for stripe_id, row in rows.items():
        assert row.status in SETTLED, (stripe_id, row.type, row.status, row.status_reason)
        applied = row.attempts_log.filter(outcome="applied").count()
        assert applied == (row.status == "processed"), (stripe_id, applied, row.status)
    for story in stories:
        payout = Payout.objects.get(pk=story.payout.pk)
        state = (payout.status, payout.is_reversed)
        assert state == (story.lifecycle[-1], story.reversed), (story.lifecycle, story.reversal)
        for held in story.held:
            assert rows[held].status == "held", rows[held].status_reason
        processed = WebhookEvent.objects.filter(stripe_object_id=payout.stripe_payout_id,
                                                status="processed").count()
        assert payout.events_applied == processed
        txns = PaymentTransaction.objects.filter(transfers__payout_items__payout=payout)
        assert {t.payed_out for t in txns} == {not story.money_back}
        transfers = set(PaymentTransfer.objects.filter(payout_items__payout=payout)
                        .values_list("status", flat=True))
        expected = ("failed" if story.money_back else
                    "paid" if payout.status == "paid" else "pending")
        assert transfers == {expected}, (story.lifecycle, story.reversal, transfers)
        if story.reversal:
            reversal = Payout.objects.get(stripe_payout_id=story.reversal_id)
            assert (reversal.original_payout_id, reversal.status) == (payout.pk, story.reversal)
    assert ledger_violations() == []


@given(specs=story_specs, data=st.data())
def test_any_delivery_order_ends_at_the_models_ledger(specs: list[dict[str, Any]],
                                                       data: st.DataObject) -> None:
    t0 = int(time.time()) - 7200
    stories = [build(spec, t0) for spec in specs]
    events = [e for story in stories for e in story.events]
    order = data.draw(st.permutations(events), label="order")
    twice = data.draw(st.lists(st.sampled_from(events), max_size=4), label="delivered twice")
    plan = list(order)
    for event in twice:  # a duplicate comes after its first delivery, at any later moment
        plan.insert(data.draw(st.integers(plan.index(event) + 1, len(plan))), event)
    stored_first = data.draw(st.lists(st.booleans(), min_size=len(plan), max_size=len(plan)),
                             label="stored for a worker")
    jobs = [lambda e=event, s=first: deliver(e, s)
            for event, first in zip(plan, stored_first, strict=True)]
    while jobs:  # some at the same moment, from several threads
        size = data.draw(st.integers(1, min(3, len(jobs))), label="at once")
        together(jobs[:size])
        jobs = jobs[size:]
    staff, _ = User.objects.get_or_create(username="property-support")
    replayed = data.draw(st.lists(st.sampled_from(events), max_size=3, unique_by=id),
                         label="replayed")
    pks = [WebhookEvent.objects.get(stripe_event_id=e["id"]).pk for e in replayed]
    together([lambda pk=pk: event_replay(event_id=pk, requested_by=staff) for pk in pks] or
             [lambda: None])
    drain()

    check(stories)
    duplicates = Counter(WebhookEvent.objects.values_list("stripe_event_id", flat=True))
    assert max(duplicates.values()) == 1
