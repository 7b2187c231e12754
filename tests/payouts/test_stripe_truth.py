"""Stripe as the source of truth, against the fake Stripe over real HTTP: reads retried as
Stripe advises, missed events recovered (sync_events), payouts reconciled
(reconcile_payouts), unknown payouts fetched, and the jobs' schedule in the workers.

Every test ends with the ledger's invariant check (tests/conftest.py).
"""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from payouts import stripe_events
from payouts.models import (
    JobRun,
    PaymentTransaction,
    Payout,
    ScheduledJob,
    Seller,
    WebhookEvent,
)
from payouts.services import jobs, stripe_sync
from payouts.services.outcome import Outcome
from payouts.services.processing import Trigger, event_process, event_receive
from payouts.stripe_api import (
    StripeKeyRefused,
    StripeMissing,
    StripeNotConfigured,
    StripeReader,
    StripeUnavailable,
)
from tests.factories import make_payout, make_seller
from tests.fakestripe import FakeStripe
from tests.payouts.helpers import REPO, deliver, ledger_state, payout_event, server_env

pytestmark = pytest.mark.django_db(transaction=True)

API_KEY = "sk_test_fake"
Source = WebhookEvent.Source
RUN_S = 120


@pytest.fixture
def fake(settings: Any) -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        settings.STRIPE_API_KEY = API_KEY
        settings.STRIPE_API_BASE = server.url
        settings.STRIPE_TIMEOUT_SECONDS = 2
        yield server


def reader(sleeps: list[float] | None = None) -> StripeReader:
    return StripeReader(sleep=(sleeps if sleeps is not None else []).append)


def at_stripe(fake: FakeStripe, payout: Payout, status: str | None = None,
              **fields: Any) -> dict[str, Any]:
    """Our payout as Stripe has it, on its seller's account (no events yet); our arrival
    date is set to Stripe's."""
    obj = stripe_events.payout_object(
        payout.stripe_payout_id or "", status=status or payout.status,
        **{"amount": payout.amount, "currency": payout.currency, **fields})
    Payout.objects.filter(pk=payout.pk).update(
        arrival_date=datetime.fromtimestamp(obj["arrival_date"], tz=UTC))
    return fake.add_payout(obj, payout.seller.stripe_account_id if payout.seller else "",
                           events=False)


def released(payout: Payout) -> bool:
    return all(not paid for _, paid, _ in ledger_state(payout)["txns"])


def command(name: str, *args: str) -> tuple[int, str, str]:
    """Run a management command in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(name, *args, stdout=out, stderr=err)
        code = 0
    except CommandError as exc:
        code = exc.returncode
        err.write(str(exc))
    return code, out.getvalue(), err.getvalue()


# --- reads, retried -----------------------------------------------------------------------


def test_reads_are_retried_on_429_5xx_timeouts_and_bodies_that_are_not_json(
        fake: FakeStripe, settings: Any) -> None:
    payout = fake.add_payout(stripe_events.payout_object("po_read", status="paid"), "acct_r")
    settings.STRIPE_TIMEOUT_SECONDS = 0.5
    fake.fail_next("/v1/payouts/po_read", 429)
    fake.fail_next("/v1/payouts/po_read", 500)
    fake.garble_next("/v1/payouts/po_read")
    fake.slow_next("/v1/payouts/po_read", 2)
    sleeps: list[float] = []
    client = reader(sleeps)
    answer = client.get("/v1/payouts/po_read", account="acct_r")
    assert answer.data == payout and answer.request_id.startswith("req_")
    assert client.requests == 5
    # Exponential backoff with jitter: each wait within [ceiling/2, ceiling].
    assert len(sleeps) == 4
    for attempt, slept in enumerate(sleeps, 1):
        ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
        assert ceiling / 2 <= slept <= ceiling


def test_stripe_should_retry_is_honoured(fake: FakeStripe) -> None:
    fake.add_payout(stripe_events.payout_object("po_sr", status="paid"), "acct_r")
    fake.fail_next("/v1/payouts/po_sr", 500, should_retry=False)
    client = reader()
    with pytest.raises(StripeUnavailable, match="after 1 attempt"):
        client.get("/v1/payouts/po_sr", account="acct_r")
    # A 400 is not worth a retry, unless Stripe says it is.
    fake.fail_next("/v1/payouts/po_sr", 400, should_retry=True)
    assert client.get("/v1/payouts/po_sr", account="acct_r").data["id"] == "po_sr"
    assert client.requests == 3


def test_retries_are_bounded_in_count_and_time(fake: FakeStripe, settings: Any) -> None:
    fake.add_payout(stripe_events.payout_object("po_b", status="paid"), "acct_r")
    settings.STRIPE_READ_ATTEMPTS = 3
    for _ in range(10):
        fake.fail_next("/v1/payouts/po_b", 503)
    client = reader()
    with pytest.raises(StripeUnavailable, match="after 3 attempt"):
        client.get("/v1/payouts/po_b", account="acct_r")
    assert client.requests == 3
    settings.STRIPE_READ_ATTEMPTS = 10
    settings.STRIPE_READ_DEADLINE_SECONDS = 1.0  # backoff 0.25-0.5, 0.5-1: the 3rd would pass it
    client = reader()
    with pytest.raises(StripeUnavailable):
        client.get("/v1/payouts/po_b", account="acct_r")
    assert client.requests <= 3


def test_a_bad_key_stops_at_once_naming_the_setting(fake: FakeStripe, settings: Any) -> None:
    settings.STRIPE_API_KEY = "sk_test_"  # the fake refuses it: 401
    client = reader()
    with pytest.raises(StripeKeyRefused, match="STRIPE_API_KEY"):
        client.get("/v1/events")
    assert client.requests == 1


def test_a_key_of_the_other_mode_is_refused_before_any_request(fake: FakeStripe,
                                                              settings: Any) -> None:
    settings.STRIPE_LIVEMODE = True
    with pytest.raises(StripeNotConfigured, match="STRIPE_API_KEY is not a live-mode key"):
        reader()
    assert command("sync_events")[0] == 2
    assert not fake.requests and not JobRun.objects.exists()


def test_a_payout_is_found_only_on_its_own_account(fake: FakeStripe) -> None:
    fake.add_payout(stripe_events.payout_object("po_own", status="paid"), "acct_a")
    with pytest.raises(StripeMissing):
        reader().get("/v1/payouts/po_own", account="acct_b")
    with pytest.raises(StripeMissing):
        reader().get("/v1/payouts/po_own")


# --- sync_events ----------------------------------------------------------------------------


def missed_ledger(fake: FakeStripe) -> dict[str, Any]:
    """A ledger whose webhooks were lost: at Stripe, one payout was paid, one failed,
    one seller got a payout we never heard of, and the platform paid itself out."""
    seller = make_seller()
    paid, failed = make_payout(seller), make_payout(seller)
    for payout in (paid, failed):
        at_stripe(fake, payout)
    fake.set_status(paid.stripe_payout_id, "paid")
    fake.set_status(failed.stripe_payout_id, "failed", **stripe_events.failed_payout_defaults())
    unknown = fake.add_payout(stripe_events.payout_object("po_unknownToUs", status="pending",
                                                          amount=4200), seller.stripe_account_id)
    fake.set_status("po_unknownToUs", "in_transit")
    fake.add_payout(stripe_events.payout_object("po_platform1", status="pending", amount=9900))
    fake.set_status("po_platform1", "paid")
    return {"seller": seller, "paid": paid, "failed": failed, "unknown": unknown}


def test_sync_events_brings_a_ledger_that_missed_events_to_stripes_state(
        fake: FakeStripe) -> None:
    world = missed_ledger(fake)
    account = world["seller"].stripe_account_id
    # One listed event carries no ``account``: listed under the account, it is its event.
    bare = fake.events_of(account)[-1]
    for _owner, event in fake.events:
        if event["id"] == bare["id"]:
            del event["account"]

    code, out, _ = command("sync_events", "--days", "3")
    assert code == 0, out
    assert f"{account}: listed 4, new 4, applied 4, held 0" in out
    assert "platform: listed 2, new 2, applied 2, held 0" in out
    assert "sync_events: 2 account(s), listed 6, new 6, applied 6, held 0" in out

    world["paid"].refresh_from_db()
    world["failed"].refresh_from_db()
    assert (world["paid"].status, world["failed"].status) == ("paid", "failed")
    assert world["failed"].failure_code == "account_closed" and released(world["failed"])
    unknown = Payout.objects.get(stripe_payout_id="po_unknownToUs")
    assert (unknown.status, unknown.amount, unknown.seller) == ("in_transit", 4200,
                                                                world["seller"])
    assert Payout.objects.get(stripe_payout_id="po_platform1").status == "paid"
    # Stored as fetched from the API, the body exactly as Stripe listed it.
    stored = WebhookEvent.objects.get(stripe_event_id=bare["id"])
    assert stored.source == Source.EVENTS_API and stored.account == account
    assert json.loads(bytes(stored.raw_body)) == bare and "account" not in bare
    assert stored.source_detail == "sync_events (command line)"
    assert not fake.seen("POST"), "sync_events never writes to Stripe"
    run = JobRun.objects.get(job=JobRun.Job.SYNC_EVENTS)
    assert (run.status, run.trigger, run.counts["new"]) == ("ok", "command", 6)

    before = {p.pk: (p.status, p.updated_at) for p in Payout.objects.all()}
    code, out, _ = command("sync_events")
    assert code == 0 and "listed 6, new 0, applied 0" in out
    assert {p.pk: (p.status, p.updated_at) for p in Payout.objects.all()} == before


def test_sync_events_follows_pages_and_lists_only_payout_events_in_the_window(
        fake: FakeStripe) -> None:
    seller = make_seller()
    for n in range(130):
        fake.add_payout(stripe_events.payout_object(f"po_page{n:04d}", status="pending"),
                        seller.stripe_account_id)
    old = stripe_events.payout_event(
        "payout.paid", stripe_events.payout_object("po_old", status="paid"),
        account=seller.stripe_account_id, created=fake.now() - 5 * 86400)
    other = stripe_events.payout_event("payout.paid", stripe_events.payout_object(
        "po_other", status="paid"), account=seller.stripe_account_id)
    other["type"] = "transfer.created"
    fake.events[:0] = [(seller.stripe_account_id, old)]
    fake.events.append((seller.stripe_account_id, other))

    code, out, _ = command("sync_events", "--days", "2")
    assert code == 0 and f"{seller.stripe_account_id}: listed 130, new 130, applied 130" in out
    pages = fake.seen("GET", "/v1/events")
    assert [r.params.get("starting_after") is not None for r in pages].count(True) == 1
    assert all(r.params["type"] == "payout.*" and "created[gte]" in r.params for r in pages)
    assert Payout.objects.filter(seller=seller).count() == 130
    assert not WebhookEvent.objects.filter(stripe_event_id__in=[old["id"], other["id"]]).exists()
    assert command("sync_events", "--days", "31")[0] == 1


def test_two_sync_runs_at_once_store_each_event_once(fake: FakeStripe,
                                                     test_database_url: str) -> None:
    sellers = [make_seller() for _ in range(4)]
    for seller in sellers:
        for n in range(8):
            po = f"po_{seller.stripe_account_id[-6:]}x{n}"
            fake.add_payout(stripe_events.payout_object(po, status="pending"),
                            seller.stripe_account_id)
            fake.set_status(po, "in_transit")
            fake.set_status(po, "paid")
    env = server_env(test_database_url, STRIPE_API_KEY=API_KEY, STRIPE_API_BASE=fake.url)
    argv = [sys.executable, "manage.py", "sync_events"]
    for _ in range(2):  # both runs wait on their first page, then list the sellers together
        fake.slow_next("/v1/events", 1.5)
    runs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=RUN_S) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    events = WebhookEvent.objects.filter(source=Source.EVENTS_API)
    assert events.count() == 96 == len({e.stripe_event_id for e in events})
    assert set(events.values_list("status", flat=True)) == {"processed"}
    news = [int(out.split("new ")[-1].split(",")[0]) for out, _ in outputs]
    assert sum(news) == 96, outputs
    assert set(Payout.objects.values_list("status", flat=True)) == {"paid"}
    assert Payout.objects.count() == 32
    assert set(Payout.objects.values_list("events_applied", flat=True)) == {3}


def test_a_bad_key_stops_sync_and_reconcile_and_writes_nothing(fake: FakeStripe,
                                                               settings: Any) -> None:
    world = missed_ledger(fake)
    settings.STRIPE_API_KEY = "sk_test_"  # refused by the fake: 401
    for name in ("sync_events", "reconcile_payouts"):
        code, out, err = command(name, *(["--apply"] if name == "reconcile_payouts" else []))
        assert code == 2 and "STRIPE_API_KEY" in err, (out, err)
    assert not WebhookEvent.objects.exists()
    world["paid"].refresh_from_db()
    assert world["paid"].status == "in_transit" and not world["paid"].review_reason
    assert set(JobRun.objects.values_list("status", flat=True)) == {"failed"}
    settings.STRIPE_API_KEY = ""
    code, _, err = command("sync_events")
    assert code == 2 and "STRIPE_API_KEY is not set" in err


def test_an_account_stripe_refuses_is_reported_and_the_others_are_synced(
        fake: FakeStripe) -> None:
    world = missed_ledger(fake)
    gone = make_seller()
    fake.revoke(gone.stripe_account_id)
    code, out, err = command("sync_events")
    assert code == 2
    assert f"{gone.stripe_account_id}: not listed: GET /v1/events on {gone.stripe_account_id}: " \
           "HTTP 401 The provided key" in err
    assert "listed 6, new 6, applied 6, held 0, waiting 0, accounts not listed 1" in out
    world["paid"].refresh_from_db()
    assert world["paid"].status == "paid"
    run = JobRun.objects.get()
    assert run.status == "failed" and "does not have access" in run.error


# --- reconcile_payouts ----------------------------------------------------------------------


def test_reconcile_reports_drift_and_apply_brings_it_to_stripes_state(
        fake: FakeStripe) -> None:
    seller = make_seller()
    failed_silently = make_payout(seller)
    matching = make_payout(seller)
    late = make_payout(seller)
    for payout in (failed_silently, matching, late):
        at_stripe(fake, payout)
    fake.set_status(failed_silently.stripe_payout_id, "failed", events=False,
                    failure_code="no_account")
    new_arrival = int(time.time()) + 5 * 86400
    fake.set_status(late.stripe_payout_id, "in_transit", events=False, arrival_date=new_arrival)

    code, out, _ = command("reconcile_payouts")
    assert code == 1
    lines = out.splitlines()
    assert (f"{failed_silently.stripe_payout_id} ({seller.stripe_account_id}): status: ours "
            "in_transit, Stripe failed; failure_code: ours none, Stripe no_account") in lines
    assert any(line.startswith(f"{late.stripe_payout_id} ") and "arrival_date: ours" in line
               for line in lines)
    assert matching.stripe_payout_id not in out
    assert "checked 3, drifted 2, missing at Stripe 0" in out
    failed_silently.refresh_from_db()
    assert failed_silently.status == "in_transit" and not WebhookEvent.objects.exists()

    code, out, _ = command("reconcile_payouts", "--apply")
    assert code == 1 and "applied 2, not applied 0" in out
    failed_silently.refresh_from_db()
    late.refresh_from_db()
    assert (failed_silently.status, failed_silently.failure_code) == ("failed", "no_account")
    assert released(failed_silently) and not released(late)
    assert late.arrival_date == datetime.fromtimestamp(new_arrival, tz=UTC)
    resync = WebhookEvent.objects.get(stripe_object_id=failed_silently.stripe_payout_id)
    assert (resync.source, resync.type, resync.status) == (Source.RESYNC, "payout.failed",
                                                           "processed")
    assert resync.source_detail == "reconcile_payouts --apply (command line)"
    assert resync.kept_by_stripe_until is None
    assert failed_silently.last_event_id == resync.stripe_event_id

    assert command("reconcile_payouts")[0] == 0  # a second run finds nothing
    assert not fake.seen("POST")


def test_reconcile_holds_an_amount_mismatch_and_keeps_a_payout_stripe_lacks(
        fake: FakeStripe) -> None:
    seller = make_seller()
    other_amount = make_payout(seller)
    at_stripe(fake, other_amount, status="failed", amount=other_amount.amount + 1)
    vanished = make_payout(seller)  # never at Stripe: 404

    code, out, _ = command("reconcile_payouts", "--apply")
    assert code == 1
    assert f"{vanished.stripe_payout_id} ({seller.stripe_account_id}): missing at Stripe" in out
    assert "amount: ours 3000, Stripe 3001" in out and "-> held: disagrees" in out
    other_amount.refresh_from_db()
    vanished.refresh_from_db()
    assert other_amount.status == "in_transit" and not released(other_amount)
    assert "not applied (held" in other_amount.review_reason
    assert WebhookEvent.objects.get(stripe_object_id=other_amount.stripe_payout_id).status == "held"
    assert vanished.status == "in_transit" and "does not know" in vanished.review_reason
    run = JobRun.objects.get()
    assert run.counts == {"checked": 2, "drifted": 1, "missing": 1, "applied": 0,
                          "not_applied": 1, "errors": 0}


def test_reconcile_marks_what_the_rules_refuse_for_review(fake: FakeStripe) -> None:
    """Our payout failed (its money released); Stripe says paid: not applied, a person looks."""
    payout = make_payout(make_seller(), status="failed")
    PaymentTransaction.objects.filter(transfers__payout_items__payout=payout).update(
        payed_out=False, actual_release_date=None)
    at_stripe(fake, payout, status="paid")
    code, out, _ = command("reconcile_payouts", "--apply")
    assert code == 1 and "-> skipped: payout is failed, a final status" in out
    payout.refresh_from_db()
    assert payout.status == "failed" and "Stripe has status paid, not applied" in \
        payout.review_reason


def test_reconcile_checks_open_marked_and_recent_payouts_only(fake: FakeStripe) -> None:
    seller = make_seller()
    open_ = make_payout(seller)
    old_paid = make_payout(seller, status="paid")
    marked = make_payout(seller, status="paid")
    Payout.objects.filter(pk__in=[old_paid.pk, marked.pk]).update(
        updated_at=timezone.now() - timedelta(days=8))
    Payout.objects.filter(pk=marked.pk).update(review_reason="a tie")
    assert list(stripe_sync.payouts_to_reconcile()) == [open_, marked]


def test_payouts_of_an_account_stripe_refuses_do_not_stop_reconcile(fake: FakeStripe) -> None:
    gone, kept = make_seller(), make_seller()
    refused = [make_payout(gone) for _ in range(4)]
    drifted = make_payout(kept)
    for payout in [*refused, drifted]:
        at_stripe(fake, payout)
    fake.set_status(drifted.stripe_payout_id, "paid", events=False)
    fake.revoke(gone.stripe_account_id, status=403)
    code, out, err = command("reconcile_payouts", "--apply")
    assert code == 2, (out, err)  # drifted, and not every payout could be checked
    assert f"{drifted.stripe_payout_id} ({kept.stripe_account_id}): status: ours in_transit" in out
    assert err.count("HTTP 403") == 4 and "errors 4" in out
    drifted.refresh_from_db()
    assert drifted.status == "paid"


def test_reconcile_lists_an_accounts_recent_payouts_and_gets_the_old_ones(
        fake: FakeStripe) -> None:
    seller = make_seller()
    recent = [make_payout(seller) for _ in range(5)]
    old = make_payout(seller)
    Payout.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=20))
    for payout in recent:
        at_stripe(fake, payout)
    at_stripe(fake, old, created=int(time.time()) - 20 * 86400)
    for n in range(150):  # newer payouts of the account: ours are on the second page
        fake.add_payout(stripe_events.payout_object(f"po_other{n:04d}", status="paid",
                                                    created=int(time.time()) + 10),
                        seller.stripe_account_id, events=False)
    fake.set_status(recent[0].stripe_payout_id, "failed", events=False)
    fake.set_status(old.stripe_payout_id, "paid", events=False)
    code, out, _ = command("reconcile_payouts")
    assert code == 1 and "checked 6, drifted 2" in out
    lists = fake.seen("GET", "/v1/payouts")
    assert [r.path for r in lists].count("/v1/payouts") == 2  # two pages of 100
    assert [r.path for r in lists if r.path != "/v1/payouts"] == [
        f"/v1/payouts/{old.stripe_payout_id}"]


def test_stripe_unreachable_stops_reconcile_after_a_few_payouts(fake: FakeStripe,
                                                                settings: Any) -> None:
    settings.STRIPE_READ_ATTEMPTS = 1
    payouts = [make_payout() for _ in range(5)]
    for payout in payouts:
        at_stripe(fake, payout)
        fake.fail_next(f"/v1/payouts/{payout.stripe_payout_id}", 503)
    code, _out, err = command("reconcile_payouts", "--apply")
    assert code == 2 and "HTTP 503" in err
    assert len(fake.seen("GET", "/v1/payouts/")) == 3
    assert JobRun.objects.get().status == "failed"


# --- unknown payouts ------------------------------------------------------------------------


def test_an_event_for_an_unknown_payout_fetches_it_from_stripe(fake: FakeStripe,
                                                               inline_server: Any) -> None:
    seller = make_seller()
    fake.add_payout(stripe_events.payout_object("po_neverCreated", status="paid",
                                                amount=5100), seller.stripe_account_id)
    event = payout_event("payout.paid", "po_neverCreated", created=int(time.time()) - 60,
                         account=seller.stripe_account_id, amount=5100)
    assert deliver(inline_server.url, event).status == 200
    stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
    assert stored.status == "failed", "a delivery never waits on Stripe's API"
    outcome = event_process(event_id=stored.pk, trigger=Trigger.WORKER)
    # Stripe's payout (paid) is newer than the event: the event changes nothing more.
    assert outcome.kind == Outcome.SKIPPED, outcome
    fetched = stripe_events.derived_id("resync", "created", "po_neverCreated")
    assert outcome.reason.startswith(f"po_neverCreated fetched from Stripe ({fetched}); "
                                     "older than")
    payout = Payout.objects.get(stripe_payout_id="po_neverCreated")
    assert (payout.status, payout.amount, payout.seller) == ("paid", 5100, seller)
    resync = WebhookEvent.objects.get(source=Source.RESYNC)
    assert resync.type == "payout.created" and event["id"] in resync.source_detail


def test_a_reversal_of_an_unknown_payout_fetches_both_once(fake: FakeStripe,
                                                          inline_server: Any) -> None:
    seller = make_seller()
    account = seller.stripe_account_id
    fake.add_payout(stripe_events.payout_object("po_origUnknown", status="paid", amount=700,
                                                reversed_by="po_revUnknown"), account)
    fake.add_payout(stripe_events.payout_object("po_revUnknown", status="paid", amount=-700,
                                                original_payout="po_origUnknown"), account)
    event = payout_event("payout.paid", "po_revUnknown", created=int(time.time()) - 60,
                         account=account, amount=-700, original_payout="po_origUnknown")
    deliver(inline_server.url, event)
    stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
    for _ in range(2):  # a second attempt fetches nothing new
        event_process(event_id=stored.pk, trigger=Trigger.WORKER)
    original = Payout.objects.get(stripe_payout_id="po_origUnknown")
    reversal = Payout.objects.get(stripe_payout_id="po_revUnknown")
    assert reversal.original_payout == original and original.is_reversed
    assert sorted(WebhookEvent.objects.filter(source=Source.RESYNC).values_list(
        "stripe_event_id", flat=True)) == sorted(
        stripe_events.derived_id("resync", "created", po)
        for po in ("po_origUnknown", "po_revUnknown"))
    assert len(fake.seen("GET", "/v1/payouts/po_revUnknown")) == 1


def test_an_unknown_payout_of_an_unknown_seller_or_without_a_key_waits(
        fake: FakeStripe, settings: Any, inline_server: Any) -> None:
    fake.add_payout(stripe_events.payout_object("po_strangerA", status="paid"), "acct_stranger")
    event = payout_event("payout.paid", "po_strangerA", created=int(time.time()) - 60,
                         account="acct_stranger")
    deliver(inline_server.url, event)
    stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
    assert event_process(event_id=stored.pk, trigger=Trigger.WORKER).kind == Outcome.RETRY
    Seller.objects.create(name="Stranger", stripe_account_id="acct_stranger")
    settings.STRIPE_API_KEY = ""
    assert event_process(event_id=stored.pk, trigger=Trigger.WORKER).kind == Outcome.RETRY
    assert not fake.seen("GET") and not Payout.objects.exists()


def test_stripe_lacking_the_payout_too_is_said_on_the_event(fake: FakeStripe,
                                                            inline_server: Any) -> None:
    seller = make_seller()
    event = payout_event("payout.failed", "po_nowhere", created=int(time.time()) - 60,
                         account=seller.stripe_account_id)
    deliver(inline_server.url, event)
    stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
    outcome = event_process(event_id=stored.pk, trigger=Trigger.WORKER)
    assert outcome.kind == Outcome.RETRY and "No such payout: 'po_nowhere'" in outcome.reason


def test_a_resync_is_ordered_among_real_events_by_stripes_clock(fake: FakeStripe) -> None:
    """Older deliveries after a resync change nothing; newer ones apply."""
    payout = make_payout(make_seller())
    at_stripe(fake, payout, status="paid")
    assert command("reconcile_payouts", "--apply")[0] == 1
    payout.refresh_from_db()
    assert payout.status == "paid"
    resync = WebhookEvent.objects.get(source=Source.RESYNC)
    account = payout.seller.stripe_account_id
    older = payout_event("payout.updated", payout.stripe_payout_id, "in_transit",
                         created=int(resync.stripe_created.timestamp()) - 30, account=account)
    newer = payout_event("payout.failed", payout.stripe_payout_id,
                         created=fake.clock() + 5, account=account,
                         **stripe_events.failed_payout_defaults())
    for event in (older, newer):
        event_receive(event, stripe_events.encode(event), {})
    assert WebhookEvent.objects.get(stripe_event_id=older["id"]).status == "skipped"
    payout.refresh_from_db()
    assert payout.status == "failed" and released(payout)


def test_a_resync_not_applied_is_not_sent_again_while_stripe_says_the_same(
        fake: FakeStripe) -> None:
    payout = make_payout(make_seller())
    at_stripe(fake, payout, amount=payout.amount + 50)
    assert command("reconcile_payouts", "--apply")[0] == 1
    code, out, _ = command("reconcile_payouts", "--apply")
    assert code == 1 and "-> not sent again: resync_" in out and "is held" in out
    assert WebhookEvent.objects.filter(source=Source.RESYNC).count() == 1
    fake.set_status(payout.stripe_payout_id, "paid", events=False)  # Stripe moved on
    command("reconcile_payouts", "--apply")
    assert WebhookEvent.objects.filter(source=Source.RESYNC).count() == 2


# --- the schedule ----------------------------------------------------------------------------


def test_one_runner_leases_a_due_job(fake: FakeStripe) -> None:
    interval = timedelta(minutes=15)
    barrier = threading.Barrier(4)
    won: list[str] = []

    def claim(runner: str) -> None:
        try:
            barrier.wait()
            if jobs.lease_due("sync_events", interval, runner):
                won.append(runner)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == 1
    assert not jobs.lease_due("sync_events", interval, "late")
    # Its runner died: the lease runs out, the next worker takes it and closes its run.
    dead = JobRun.objects.create(job="sync_events", trigger="schedule", started_at=timezone.now())
    ScheduledJob.objects.filter(name="sync_events").update(
        lease_until=timezone.now() - timedelta(seconds=1))
    assert jobs.lease_due("sync_events", interval, "next")
    dead.refresh_from_db()
    assert dead.status == "abandoned"
    # Done: not due again before its interval.
    jobs.lease_free("sync_events", "next", done=True)
    assert not jobs.lease_due("sync_events", interval, "other")


def test_a_scheduled_run_that_loses_its_lease_stops(fake: FakeStripe, monkeypatch: Any) -> None:
    monkeypatch.setattr(jobs, "RENEW_EVERY_S", 0.1)
    make_seller()
    assert jobs.lease_due("sync_events", timedelta(minutes=15), "me")
    job = jobs.Scheduled("sync_events", "me", stopping=lambda: False)
    job.runner = "me"
    fake.slow_next("/v1/events", 1.5)  # the platform's page: the lease is taken meanwhile
    threading.Timer(0.5, lambda: (ScheduledJob.objects.filter(name="sync_events").update(
        leased_by="other", lease_until=timezone.now() + timedelta(minutes=2)),
        connection.close())).start()
    run = job.run()
    assert run.status == "abandoned" and "lease" in run.error
    assert run.counts["accounts"] == 1  # the platform was listed before it stopped
    assert ScheduledJob.objects.get(name="sync_events").leased_by == "other"


def test_a_stopping_worker_leaves_its_job_due(fake: FakeStripe) -> None:
    assert jobs.lease_due("reconcile_payouts", timedelta(minutes=60), "me")
    make_payout()
    job = jobs.Scheduled("reconcile_payouts", "me", stopping=lambda: True)
    job.runner = "me"
    assert job.run().status == "abandoned"
    assert jobs.lease_due("reconcile_payouts", timedelta(minutes=60), "next")


def test_a_scheduled_sync_lists_back_to_the_last_full_run(settings: Any) -> None:
    assert jobs.scheduled_sync_days() == settings.SYNC_EVENTS_DAYS == 3
    run = JobRun.objects.create(job="sync_events", trigger="schedule", status="ok",
                                started_at=timezone.now() - timedelta(days=10, hours=2))
    assert jobs.scheduled_sync_days() == 11
    JobRun.objects.filter(pk=run.pk).update(started_at=timezone.now() - timedelta(days=40))
    assert jobs.scheduled_sync_days() == 30


def test_workers_run_the_scheduled_jobs_one_runner_at_a_time(
        fake: FakeStripe, test_database_url: str) -> None:
    world = missed_ledger(fake)
    fake.set_status(world["paid"].stripe_payout_id, "failed", events=False)  # reconcile's job
    env = server_env(test_database_url, STRIPE_API_KEY=API_KEY, STRIPE_API_BASE=fake.url,
                     SYNC_EVENTS_MINUTES="0.02", RECONCILE_MINUTES="0.03")
    argv = [sys.executable, "manage.py", "process_webhooks", "--idle-sleep", "0.1"]
    workers = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = JobRun.objects.exclude(status="running")
            if (done.filter(job="sync_events").count() >= 3
                    and done.filter(job="reconcile_payouts").count() >= 2):
                break
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.terminate()
        outputs = [worker.communicate(timeout=RUN_S) for worker in workers]
    runs = list(JobRun.objects.filter(trigger="schedule").order_by("started_at"))
    for job in ("sync_events", "reconcile_payouts"):
        spans = [(r.started_at, r.finished_at or timezone.now()) for r in runs if r.job == job]
        assert len(spans) >= 2, outputs
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"two {job} runs overlapped"
    assert {r.status for r in runs} <= {"ok", "drifted", "abandoned"}, [r.error for r in runs]
    world["paid"].refresh_from_db()
    assert world["paid"].status == "failed" and released(world["paid"])
    assert Payout.objects.get(stripe_payout_id="po_unknownToUs").status == "in_transit"
