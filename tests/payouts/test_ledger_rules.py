"""The ledger's rules with real signed deliveries: canceled payouts, events that disagree
with our payout (held), reversals in Stripe's order and shuffled, same-second ties.

Deliveries go over HTTP, signed, to gunicorn in inline mode against the test
database; what waits is then processed in-process as a worker would. Every test
ends with the ledger's invariant check (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from payouts import stripe_events
from payouts.models import PaymentTransaction, PaymentTransfer, Payout, Seller, WebhookEvent
from payouts.services import inbox
from payouts.services.ledger import METADATA_KEY
from payouts.services.outcome import Outcome
from payouts.services.processing import event_process, event_replay
from tests.factories import make_payout, make_seller
from tests.payouts.helpers import Server, deliver, drain, ledger_state, payout_event

pytestmark = pytest.mark.django_db(transaction=True)

T0 = int(time.time()) - 3600
Status = WebhookEvent.Status


def evt(event_type: str, payout_id: str, status: str | None = None, *, at: int = 0,
        **fields: Any) -> dict[str, Any]:
    """An event created ``at`` seconds after T0, agreeing with our payout unless told."""
    return payout_event(event_type, payout_id, status, created=T0 + at, object_created=T0,
                        **fields)


def send(server: Server, event: dict[str, Any]) -> str:
    """Deliver ``event`` signed over HTTP; the event's status after the inline attempt."""
    answer = deliver(server.url, event)
    assert answer.status == 200, answer.body
    body = answer.json()
    return "duplicate" if body["duplicate"] else str(body["status"])


def stored(event: dict[str, Any]) -> WebhookEvent:
    return WebhookEvent.objects.get(stripe_event_id=event["id"])


def released(payout: Payout) -> bool:
    """Every transaction of the payout is owed again, and its transfers stand as failed."""
    state = ledger_state(payout)
    return (all(not paid and at is None for _, paid, at in state["txns"])
            and {status for _, status in state["transfers"]} == {"failed"})


def paid_out(payout: Payout) -> bool:
    return all(paid and at is not None for _, paid, at in ledger_state(payout)["txns"])


@pytest.fixture
def staff() -> User:
    return User.objects.create_user("support-1", password="x" * 12)


# --- 1. canceled gives the money back -------------------------------------------------------


@pytest.mark.parametrize("status", ["failed", "canceled"])
def test_failed_and_canceled_release_every_transaction(inline_server, status):
    payout = make_payout(status="pending", transactions=3)
    other = make_payout(payout.seller, status="pending", transactions=2)
    other_before = ledger_state(other)

    assert send(inline_server, evt(f"payout.{status}", payout.stripe_payout_id, at=10)) == \
        "processed"

    assert Payout.objects.get(pk=payout.pk).status == status
    assert released(payout)
    assert ledger_state(other) == other_before


# --- 2. an event that disagrees with our ledger is held -----------------------------------


def other_account() -> str:
    return make_seller().stripe_account_id


MISMATCHES = {
    "account": (lambda p: {"account": other_account()},
                ["account is acct_test", "in the event, {account} on our payout"]),
    "no account": (lambda p: {"account": ""},
                   ["account is the platform in the event, {account} on our payout"]),
    "amount": (lambda p: {"amount": p.amount + 1},
               ["amount is {plus_one} in the event, {amount} on our payout"]),
    "currency": (lambda p: {"currency": "eur"},
                 ["currency is eur in the event, usd on our payout"]),
    "everything": (lambda p: {"account": other_account(), "amount": -p.amount,
                              "currency": "gbp"},
                   ["in the event, {account} on our payout",
                    "amount is -{amount} in the event, {amount} on our payout",
                    "currency is gbp in the event, usd on our payout"]),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_a_failed_event_that_disagrees_is_held_and_moves_nothing(inline_server, worker_env,
                                                                  kind):
    """Seller B's failed payout, or one for another amount or currency, naming our payout:
    held with each field and both values; the payout and its money are untouched, and no
    worker tries it again."""
    payout = make_payout(status="paid", transactions=3)
    before = ledger_state(payout)
    changes, expected = MISMATCHES[kind]
    event = evt("payout.failed", payout.stripe_payout_id, at=10, **changes(payout))

    assert send(inline_server, event) == "held"

    row = stored(event)
    assert row.status == Status.HELD and row.next_attempt_at is None
    values = {"account": payout.seller.stripe_account_id, "amount": payout.amount,
              "plus_one": payout.amount + 1}
    for text in expected:
        assert text.format(**values) in row.status_reason, row.status_reason
    assert ledger_state(payout) == before
    assert inbox.claim_due(worker="test", limit=10) == []
    assert event_process(event_id=row.pk, trigger="worker").reason == "already held"
    assert ledger_state(payout) == before


def test_a_seller_event_for_a_platform_payout_is_held(inline_server):
    payout = make_payout(status="in_transit", transactions=0)
    Payout.objects.filter(pk=payout.pk).update(seller=None, amount=5000)
    event = evt("payout.paid", payout.stripe_payout_id, at=5, account=other_account())
    assert send(inline_server, event) == "held"
    assert "on our payout" in stored(event).status_reason
    assert send(inline_server, evt("payout.paid", payout.stripe_payout_id, at=6)) == "processed"


def reserved_payout(seller: Seller, amount: int = 3000) -> Payout:
    """A payout of ours whose Stripe id we have not recorded (phase 3 not done yet)."""
    payout = make_payout(seller, transactions=3, status="pending")
    reference = f"pcp_{payout.pk:024d}"
    Payout.objects.filter(pk=payout.pk).update(
        stripe_payout_id=None, reference=reference, creation_state="reserved",
        metadata={METADATA_KEY: reference})
    return Payout.objects.get(pk=payout.pk)


def test_linking_by_our_reference_requires_the_sellers_account(inline_server):
    """Seller B's payout carrying seller A's reference (B's failed payout must never release
    A's money): held, not linked. A's own payout with it: linked and applied."""
    ours = reserved_payout(make_seller())
    stripe_id = stripe_events.new_id("po")
    foreign = evt("payout.failed", stripe_id, at=5, account=other_account(),
                  amount=ours.amount, metadata={METADATA_KEY: ours.reference})

    assert send(inline_server, foreign) == "held"
    assert "account is" in stored(foreign).status_reason
    ours.refresh_from_db()
    assert ours.stripe_payout_id is None and ours.status == "pending" and paid_out(ours)

    own = evt("payout.paid", stripe_id, at=6, account=ours.seller.stripe_account_id,
              amount=ours.amount, metadata={METADATA_KEY: ours.reference})
    assert send(inline_server, own) == "processed"
    ours.refresh_from_db()
    assert (ours.stripe_payout_id, ours.status) == (stripe_id, "paid")


def test_a_second_stripe_payout_with_our_reference_is_held(inline_server):
    """Our reference on a Stripe payout other than the one we recorded: Stripe made two
    payouts for one of ours (money paid twice); a person must look."""
    ours = reserved_payout(make_seller())
    first = stripe_events.new_id("po")
    Payout.objects.filter(pk=ours.pk).update(stripe_payout_id=first)
    second = evt("payout.created", stripe_events.new_id("po"), at=5,
                 account=ours.seller.stripe_account_id, amount=ours.amount,
                 metadata={METADATA_KEY: ours.reference})

    assert send(inline_server, second) == "held"
    assert f"which is Stripe's {first}" in stored(second).status_reason
    assert not Payout.objects.filter(stripe_payout_id=second["data"]["object"]["id"]).exists()
    ours.refresh_from_db()
    assert "Stripe made" in ours.review_reason and ours.stripe_payout_id == first


def test_a_stripe_payout_for_one_whose_creation_failed_is_held_for_review(inline_server):
    """We gave up making a payout (Stripe refused) and released its money; a payout with
    its reference turning up means Stripe made it after all: paying the released money
    again would pay it twice, so the event is held and the payout marked for review."""
    ours = reserved_payout(make_seller())
    Payout.objects.filter(pk=ours.pk).update(creation_state="failed", status="failed")
    PaymentTransaction.objects.filter(transfers__payout_items__payout=ours).update(
        payed_out=False, actual_release_date=None)
    event = evt("payout.paid", stripe_events.new_id("po"), at=5,
                account=ours.seller.stripe_account_id, amount=ours.amount,
                metadata={METADATA_KEY: ours.reference})

    assert send(inline_server, event) == "held"

    ours.refresh_from_db()
    assert ours.stripe_payout_id is None and ours.status == "failed"
    assert "whose creation failed and whose money was released" in ours.review_reason


def test_a_reversal_carrying_our_reference_is_still_a_reversal(inline_server):
    """The reverse call copies metadata: a reversal of our payout may carry our reference.
    It is a reversal all the same, never a second payout of ours."""
    ours = reserved_payout(make_seller())
    stripe_id = stripe_events.new_id("po")
    assert send(inline_server, evt("payout.paid", stripe_id, at=5,
                                   account=ours.seller.stripe_account_id, amount=ours.amount,
                                   metadata={METADATA_KEY: ours.reference})) == "processed"
    reversal = evt("payout.created", stripe_events.new_id("po"), "paid", at=50,
                   account=ours.seller.stripe_account_id, amount=-ours.amount,
                   original_payout=stripe_id, metadata={METADATA_KEY: ours.reference})

    assert send(inline_server, reversal) == "processed"

    ours.refresh_from_db()
    assert ours.is_reversed and ours.review_reason == ""
    assert released(ours)


def test_a_held_event_is_checked_again_on_replay(inline_server, staff):
    """Replay runs the checks again: still held while the ledger disagrees; applied once
    the seller's account on record is corrected."""
    payout = make_payout(status="in_transit", transactions=2)
    real_account = "acct_corrected000001"
    event = evt("payout.paid", payout.stripe_payout_id, at=5, account=real_account)
    assert send(inline_server, event) == "held"

    again = event_replay(event_id=stored(event).pk, requested_by=staff)
    assert (again.kind, again.status_after) == (Outcome.HELD, Status.HELD)

    Seller.objects.filter(pk=payout.seller_id).update(stripe_account_id=real_account)
    applied = event_replay(event_id=stored(event).pk, requested_by=staff)
    assert (applied.kind, applied.status_after) == (Outcome.APPLIED, Status.PROCESSED)
    assert Payout.objects.get(pk=payout.pk).status == "paid"
    assert [(a.trigger, a.outcome) for a in stored(event).attempts_log.all()] == [
        ("inline", "held"), ("replay", "held"), ("replay", "applied")]


def test_a_held_event_is_dismissed_with_who_and_why(inline_server, staff):
    payout = make_payout(status="paid", transactions=2)
    before = ledger_state(payout)
    event = evt("payout.failed", payout.stripe_payout_id, at=5, currency="eur")
    assert send(inline_server, event) == "held"
    row = stored(event)

    with pytest.raises(inbox.CannotDismiss, match="Say why"):
        inbox.event_dismiss(event_id=row.pk, requested_by=staff, reason="   ")
    outcome = inbox.event_dismiss(event_id=row.pk, requested_by=staff,
                                  reason="Stripe confirms: another platform's payout")

    assert (outcome.kind, outcome.status_after) == (Outcome.SKIPPED, Status.SKIPPED)
    row.refresh_from_db()
    assert row.status == Status.SKIPPED
    assert row.status_reason == ("dismissed by support-1: Stripe confirms: another "
                                 "platform's payout")
    dismissal = row.attempts_log.get(trigger="dismiss")
    assert (dismissal.requested_by, dismissal.outcome) == (staff, "skipped")
    assert dismissal.reason == row.status_reason
    assert ledger_state(payout) == before
    with pytest.raises(inbox.CannotDismiss, match="is skipped, not held"):
        inbox.event_dismiss(event_id=row.pk, requested_by=staff, reason="again")


# --- 3. reversals ------------------------------------------------------------------------------


def reversal_story(payout: Payout, outcome: str = "paid") -> dict[str, list[dict[str, Any]]]:
    """Stripe's documented order for reversing ``payout``: the original's payout.updated
    with reversed_by, then the reversal's payout.created, payout.updated, and its end."""
    reversal = stripe_events.new_id("po")
    account = payout.seller.stripe_account_id
    original = [evt("payout.updated", payout.stripe_payout_id, "paid", at=100,
                    reversed_by=reversal)]
    steps = [("payout.created", "pending"), ("payout.updated", "in_transit"),
             (f"payout.{outcome}", outcome)]
    own = [evt(event_type, reversal, status, at=200 + 10 * n, account=account,
               amount=-payout.amount, original_payout=payout.stripe_payout_id)
           for n, (event_type, status) in enumerate(steps)]
    return {"original": original, "reversal": own}


def test_a_paid_reversal_in_stripes_order_releases_the_original(inline_server):
    payout = make_payout(status="paid", transactions=3)
    other = make_payout(payout.seller, status="paid", transactions=2)
    story = reversal_story(payout)
    reversal_id = story["reversal"][0]["data"]["object"]["id"]

    assert [send(inline_server, e) for e in story["original"] + story["reversal"]] == [
        "processed"] * 4

    original = Payout.objects.get(pk=payout.pk)
    reversal = Payout.objects.get(stripe_payout_id=reversal_id)
    assert (original.status, original.reversed_by) == ("paid", reversal_id)
    assert original.reversed_at is not None and original.is_reversed and not original.is_live
    assert (reversal.original_payout, reversal.amount, reversal.status) == (
        original, -payout.amount, "paid")
    assert reversal.seller == payout.seller
    assert released(payout)
    assert paid_out(other)


def test_the_reversal_shows_wherever_the_console_shows_the_payout(inline_server, client):
    payout = make_payout(status="paid", transactions=1)
    story = reversal_story(payout)
    for event in story["original"] + story["reversal"]:
        send(inline_server, event)
    reversal_id = story["reversal"][0]["data"]["object"]["id"]
    client.force_login(User.objects.create_superuser("admin-1", password="x" * 12))

    listing = client.get("/payouts/", {"q": payout.stripe_payout_id}).content.decode()
    detail = client.get(f"/payouts/{payout.pk}/").content.decode()

    assert 'badge-reversed" title="reversed by ' + reversal_id in listing
    assert "badge-reversed" in detail and reversal_id in detail
    assert "the money is back on the seller's balance" in detail
    assert "badge-reversal" in client.get(
        f"/payouts/{Payout.objects.get(stripe_payout_id=reversal_id).pk}/").content.decode()


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))),
                         ids=lambda order: "".join(map(str, order)))
def test_a_paid_reversal_in_any_order_ends_the_same(inline_server, order):
    """Any shuffle of the four events (a reversal's event before its payout.created waits
    for it): the original is reversed once, its money released once."""
    payout = make_payout(status="paid", transactions=2)
    story = reversal_story(payout)
    events = story["original"] + story["reversal"]
    for index in order:
        send(inline_server, events[index])
    drain()

    assert {stored(e).status for e in events} <= {Status.PROCESSED, Status.SKIPPED}, [
        (stored(e).type, stored(e).status, stored(e).status_reason) for e in events]
    original = Payout.objects.get(pk=payout.pk)
    assert original.is_reversed and original.review_reason == ""
    assert released(payout)
    assert Payout.objects.get(original_payout=original).status == "paid"


@pytest.mark.parametrize("outcome", ["failed", "canceled"])
def test_a_reversal_that_fails_or_is_canceled_changes_nothing_on_the_original(inline_server,
                                                                              outcome):
    payout = make_payout(status="paid", transactions=2)
    story = reversal_story(payout, outcome)
    for event in story["original"] + story["reversal"]:
        assert send(inline_server, event) == "processed"
    original = Payout.objects.get(pk=payout.pk)
    assert original.status == "paid" and not original.is_reversed
    assert original.reversed_by  # requested, as Stripe said; never paid
    assert paid_out(payout)


def test_a_reversal_that_fails_after_it_was_paid_marks_the_original_for_review(
        inline_server):
    payout = make_payout(status="paid", transactions=2)
    story = reversal_story(payout)
    for event in story["original"] + story["reversal"]:
        send(inline_server, event)
    reversal_id = story["reversal"][0]["data"]["object"]["id"]

    assert send(inline_server, evt("payout.failed", reversal_id, at=300)) == "processed"

    original = Payout.objects.get(pk=payout.pk)
    assert "became failed after it was paid" in original.review_reason
    assert original.is_reversed and released(payout)  # nothing is taken back blindly


def test_a_reversal_of_a_payout_that_already_failed_releases_nothing_again(inline_server):
    """The original failed (money released, perhaps paid again since): its reversal being
    paid must not release those transactions a second time."""
    payout = make_payout(status="paid", transactions=2)
    assert send(inline_server, evt("payout.failed", payout.stripe_payout_id, at=50)) == \
        "processed"
    PaymentTransaction.objects.filter(transfers__payout_items__payout=payout).update(
        payed_out=True, actual_release_date=timezone.now())  # a newer payout holds them
    newer = make_payout(payout.seller, status="in_transit", transactions=0)
    for transfer in PaymentTransfer.objects.filter(payout_items__payout=payout):
        newer.payout_items.create(payment_transfer=transfer)
    story = reversal_story(payout)
    for event in story["reversal"]:
        assert send(inline_server, event) == "processed"

    original = Payout.objects.get(pk=payout.pk)
    assert not original.is_reversed
    assert "while the payout was already failed" in original.review_reason
    assert paid_out(payout)  # still held by the newer payout


def test_a_reversal_from_another_account_is_held(inline_server):
    payout = make_payout(status="paid", transactions=1)
    created = reversal_story(payout)["reversal"][0]
    created["account"] = other_account()
    assert send(inline_server, created) == "held"
    assert "as the reversal of" in stored(created).status_reason
    assert paid_out(payout)


def test_a_reversal_of_an_unknown_payout_waits(inline_server):
    payout = make_payout(status="paid", transactions=1)
    created = reversal_story(payout)["reversal"][0]
    created["data"]["object"]["original_payout"] = "po_notknownyet00000001"
    assert send(inline_server, created) == "failed"
    assert "po_notknownyet00000001" in stored(created).status_reason


# --- 4. the same second ---------------------------------------------------------------------


def test_the_same_status_in_the_same_second_changes_nothing_and_asks_for_review(
        inline_server):
    """payout.paid, then a payout.updated saying paid in the same second with another
    arrival date: which is newer cannot be told. The second is skipped, the first's
    arrival date stays, and the payout is marked for review."""
    payout = make_payout(status="in_transit", transactions=2)
    paid = evt("payout.paid", payout.stripe_payout_id, at=30, arrival_date=T0 + 86400)
    twin = evt("payout.updated", payout.stripe_payout_id, "paid", at=30,
               arrival_date=T0 + 5 * 86400, metadata={"twin": "yes"})
    assert send(inline_server, paid) == "processed"
    after_first = ledger_state(payout)["payout"]

    assert send(inline_server, twin) == "skipped"

    row = stored(twin)
    assert row.status_reason.startswith("same second and status as the applied event "
                                        f"{paid['id']}")
    now = ledger_state(payout)["payout"]
    assert (now["arrival_date"], now["metadata"], now["events_applied"]) == (
        after_first["arrival_date"], after_first["metadata"], 1)
    assert f"{twin['id']} came in the same second as {paid['id']}" in now["review_reason"]


def test_different_statuses_in_the_same_second_are_decided_by_the_table(inline_server):
    payout = make_payout(status="in_transit", transactions=2)
    failed = evt("payout.failed", payout.stripe_payout_id, at=30)
    paid = evt("payout.paid", payout.stripe_payout_id, at=30)
    assert send(inline_server, failed) == "processed"
    assert send(inline_server, paid) == "skipped"  # failed is final
    assert stored(paid).status_reason == "payout is failed, a final status"
    assert Payout.objects.get(pk=payout.pk).review_reason == ""
    assert released(payout)
