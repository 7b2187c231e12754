"""Reconciliation with Stripe in a real browser: Resync from Stripe on a payout, the
Reconciliation page, the health page's Stripe sync panel, with screenshots.

Resync needs Stripe: these tests start their own console (gunicorn) with
``STRIPE_API_KEY`` pointing at a ``FakeStripe``; the console of the other browser
tests has no key, and refuses a resync saying so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import Browser, Page, expect

from payouts import stripe_events
from payouts.models import JobRun, Payout, WebhookEvent
from tests.browser.conftest import SCREENSHOTS, TIMEOUT_MS, login
from tests.fakestripe import FakeStripe
from tests.payouts.helpers import Server, server_env

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


@pytest.fixture(scope="module")
def stripe_server(test_database_url: str, fake: FakeStripe) -> Iterator[Server]:
    server = Server(server_env(test_database_url, STRIPE_API_KEY="sk_test_fake",
                               STRIPE_API_BASE=fake.url), workers=1, threads=4)
    yield server
    server.stop()


@pytest.fixture
def stripe_page(browser: Browser, stripe_server: Server) -> Iterator[Page]:
    context = browser.new_context(base_url=stripe_server.url,
                                  viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / f"{name}.png"
    target.unlink(missing_ok=True)
    page.screenshot(path=target, full_page=True)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", target


def in_transit_payout() -> Payout:
    """A demo seller's payout in transit, nothing open on it."""
    payout = (Payout.objects.filter(status="in_transit", seller__isnull=False, review_reason="",
                                    original_payout__isnull=True, arrival_date__isnull=False)
              .exclude(payout_items=None).order_by("stripe_payout_id").first())
    assert payout is not None and payout.seller is not None
    return payout


def failed_at_stripe(fake: FakeStripe, payout: Payout) -> None:
    """Stripe has ``payout`` as we do, then failed (account_closed)."""
    assert payout.seller is not None and payout.stripe_payout_id and payout.arrival_date
    fake.add_payout(stripe_events.payout_object(
        payout.stripe_payout_id, status="in_transit", amount=payout.amount,
        currency=payout.currency, arrival_date=int(payout.arrival_date.timestamp())),
        payout.seller.stripe_account_id)
    fake.set_status(payout.stripe_payout_id, "failed", failure_code="account_closed",
                    failure_message="The bank account has been closed.")


def a_failed_sync() -> None:
    """A scheduled sync_events that Stripe did not answer, beside the demo's runs."""
    started = timezone.now() - timedelta(minutes=29)
    JobRun.objects.create(
        job=JobRun.Job.SYNC_EVENTS, trigger=JobRun.Trigger.SCHEDULE, runner="worker-1:4242:77b1",
        scope="--days 3", apply=True, started_at=started,
        finished_at=started + timedelta(seconds=61), status=JobRun.Status.FAILED,
        error="GET /v1/events on acct_1DemoBlueHeron0000 failed after 5 attempt(s): HTTP 503 "
              "Service unavailable (request req_8Hq2)")


def test_support_resyncs_a_drifted_payout_and_sees_it_on_reconciliation(demo, fake,
                                                                         stripe_page):
    page = stripe_page
    payout = in_transit_payout()
    failed_at_stripe(fake, payout)
    a_failed_sync()
    # seed_demo's reconcile run: one payout brought to Stripe's state, one missing there.
    demo_run = JobRun.objects.get(job="reconcile_payouts")
    drifted, missing = ([f for f in demo_run.findings if f["missing"] is m] for m in (False, True))
    assert len(drifted) == 1 and len(missing) == 1

    login(page, "support")
    page.goto(f"/payouts/{payout.pk}/")
    button = page.get_by_role("button", name="Resync from Stripe")
    expect(button).to_be_visible()
    shoot(page, "payout-resync-button")

    button.click()
    expect(page).to_have_url(re.compile(rf"/payouts/{payout.pk}/$"))
    message = page.locator("#messages li.msg-warning")
    expect(message).to_contain_text(f"{payout.stripe_payout_id} differed from Stripe")
    expect(message).to_contain_text("status in_transit → failed")
    expect(page.locator("h1 .badge").first).to_have_text("failed")
    resync_step = page.locator("#timeline > li", has_text="resync from Stripe")
    expect(resync_step).to_have_count(1)
    expect(resync_step).to_contain_text("Resync from Stripe by support")
    expect(resync_step.locator(".tl-head .badge").first).to_have_text("processed")
    shoot(page, "payout-resynced")

    payout.refresh_from_db()
    assert payout.status == "failed"
    event = WebhookEvent.objects.get(stripe_object_id=payout.stripe_payout_id, source="resync")
    assert event.requested_by is not None and event.requested_by.username == "support"

    page.goto(f"/events/{event.pk}/")
    expect(page.locator("#event-source")).to_contain_text("resync from Stripe")
    expect(page.locator("#kept-by-stripe")).to_have_count(0)
    shoot(page, "event-resync")

    page.locator("nav.main-nav").get_by_role("link", name="Reconciliation").click()
    expect(page.get_by_role("heading", name="Reconciliation with Stripe")).to_be_visible()
    runs = page.locator("#runs-table tbody tr")
    expect(runs).to_have_count(JobRun.objects.count())
    expect(runs.first).to_contain_text("console by support")
    expect(runs.first).to_contain_text(payout.stripe_payout_id or "")
    expect(runs.first.locator(".badge")).to_have_text("drifted")
    drift_row = page.locator("#drift-table tbody tr")
    expect(drift_row).to_have_count(1)
    expect(drift_row).to_contain_text(drifted[0]["stripe_payout_id"])
    expect(drift_row).to_contain_text("in_transit → failed")
    expect(drift_row.locator(".badge").first).to_have_text("applied")
    expect(page.locator("#missing-table tbody tr")).to_have_count(1)
    expect(page.locator("#missing-table")).to_contain_text(missing[0]["stripe_payout_id"])
    expect(page.locator("#review-link a")).to_contain_text("marked for review")
    shoot(page, "reconciliation")

    drift_row.get_by_role("link", name=re.compile(r"^resync_")).click()  # its resync event
    expect(page.locator("#event-source")).to_contain_text("reconcile_payouts --apply")
    page.go_back()
    drift_row.get_by_role("link", name=drifted[0]["stripe_payout_id"]).click()
    expect(page).to_have_url(re.compile(rf"/payouts/{drifted[0]['payout_id']}/$"))

    page.goto("/health/")
    panel = page.locator("#panel-stripe-sync")
    expect(panel.locator("#sync-sync_events .badge")).to_have_text("ok")
    reconcile = panel.locator("#sync-reconcile_payouts")
    expect(reconcile.locator(".badge")).to_have_text("drifted")
    expect(reconcile).to_contain_text("19 checked")  # the demo's full run, not our resync
    expect(panel).not_to_contain_text("Scheduled sync is off")
    panel.screenshot(path=SCREENSHOTS / "health-stripe-sync.png")
    shoot(page, "health")


def test_without_a_key_resync_says_so_and_managers_see_no_button(demo, new_page):
    payout = in_transit_payout()
    manager = new_page()
    login(manager, "manager")
    manager.goto(f"/payouts/{payout.pk}/")
    expect(manager.locator("h1")).to_contain_text(payout.stripe_payout_id or "")
    expect(manager.get_by_role("button", name="Resync from Stripe")).to_have_count(0)
    manager.goto("/health/")
    expect(manager.locator("#panel-stripe-sync #sync-off")).to_have_text(
        "Scheduled sync is off: STRIPE_API_KEY is not set.")
    manager.goto("/reconciliation/")
    expect(manager.locator("#sync-off")).to_contain_text("Scheduled sync is off")
    expect(manager.locator("#drift-table tbody tr")).to_have_count(1)  # seed_demo's run
    JobRun.objects.all().delete()
    manager.reload()
    expect(manager.locator("#no-run")).to_contain_text("No reconcile run yet")
    shoot(manager, "reconciliation-empty")
    manager.goto("/events/?status=dead")
    expect(manager.locator("#events-table .kept").first).to_contain_text("at Stripe")
    shoot(manager, "events-dead")

    support = new_page()
    login(support, "support")
    support.goto(f"/payouts/{payout.pk}/")
    support.get_by_role("button", name="Resync from Stripe").click()
    expect(support.locator("#messages li.msg-error")).to_contain_text(
        "not resynced. STRIPE_API_KEY is not set")
    shoot(support, "payout-resync-no-key")
    assert not JobRun.objects.exists()
    payout.refresh_from_db()
    assert payout.status == "in_transit"
    delivered = WebhookEvent.objects.filter(stripe_object_id=payout.stripe_payout_id,
                                            source="delivery").order_by("stripe_created").first()
    assert delivered is not None
    support.goto(f"/events/{delivered.pk}/")
    expect(support.locator("#kept-by-stripe")).to_contain_text("Stripe keeps this event until")
    shoot(support, "event-delivered")
