"""The staff console in a real browser: htmx filters and pages, replays, roles, the pages.

Each test gets the demo data of ``manage.py seed_demo`` (fixture ``demo``) and a fresh
browser context; the console is a gunicorn process on the test database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import Locator, Page, Route, expect

from payouts import selectors
from payouts.models import Payout, TransactionLog, WebhookEvent, WebhookEventAttempt
from tests.browser.conftest import SCREENSHOTS, login

pytestmark = pytest.mark.django_db(transaction=True)

REPLAY_ME = "evt_1DemoReplayMe01"  # a failed payout.paid; a replay applies it (seed_demo)
UNKNOWN_PAID = "evt_1DemoUnknownPaid01"  # failed: waits for a payout nobody knows


# --- helpers -------------------------------------------------------------------------------


def mark_document(page: Page) -> None:
    """Tag the current document: the tag survives htmx swaps, not a full page load."""
    page.evaluate("window.__sameDocument = true")


def assert_same_document(page: Page) -> None:
    assert page.evaluate("window.__sameDocument === true"), "a full page load happened"


def event_row(page: Page, stripe_event_id: str) -> Locator:
    return page.locator("#events-table tbody tr", has_text=stripe_event_id)


def replay_attempts(event: WebhookEvent) -> list[WebhookEventAttempt]:
    return list(WebhookEventAttempt.objects.filter(event=event,
                                                   trigger=WebhookEventAttempt.Trigger.REPLAY))


def payout_of(event: WebhookEvent) -> Payout:
    return Payout.objects.get(stripe_payout_id=event.stripe_object_id)


def open_failed_events(page: Page) -> None:
    page.goto("/events/?status=failed")
    expect(page.locator("#results .count")).to_have_text(
        f"{WebhookEvent.objects.filter(status='failed').count()} events")


def csrf_token(page: Page) -> str:
    tokens = [c["value"] for c in page.context.cookies() if c["name"] == "csrftoken"]
    assert tokens, "no csrftoken cookie in the browser context"
    return tokens[0]


# --- payouts list: htmx filters, search, pages ---------------------------------------------


def test_support_filters_searches_and_pages_payouts_without_full_page_loads(demo, page):
    login(page, "support")
    page.locator("nav.main-nav").get_by_role("link", name="Payouts", exact=True).click()
    expect(page).to_have_url(re.compile(r"/payouts/$"))
    expect(page.locator("#results .count")).to_have_text("49 payouts")
    mark_document(page)
    badges = page.locator("#payouts-table tbody .badge")

    # Status "failed" via the select: only #results is swapped, the address bar follows.
    failed = Payout.objects.filter(status="failed").count()
    assert failed > 0
    page.get_by_label("Status").select_option("failed")
    expect(page).to_have_url(re.compile(r"[?&]status=failed(&|$)"))
    expect(page.locator("#results .count")).to_have_text(f"{failed} payouts")
    expect(badges).to_have_text(["failed"] * failed)
    assert_same_document(page)

    # A seller's name in the search box (htmx fires after typing stops), status kept.
    seller = "Dune Coffee Roasters"
    matching = Payout.objects.filter(status="failed", seller__name__icontains="dune").count()
    assert 0 < matching < failed
    page.get_by_role("searchbox", name="Search").fill("dune")
    expect(page).to_have_url(re.compile(r"[?&]q=dune(&|$)"))
    expect(page).to_have_url(re.compile(r"[?&]status=failed(&|$)"))
    expect(page.locator("#payouts-table tbody tr")).to_have_text(
        [re.compile(re.escape(seller))] * matching)
    expect(badges).to_have_text(["failed"] * matching)
    assert_same_document(page)

    # Unfiltered, 49 payouts (one a reversal) make two pages of 25; the pager is htmx too.
    page.goto("/payouts/")
    expect(page.locator("#results .count")).to_have_text("49 payouts")
    expect(page.locator("#payouts-table tbody tr")).to_have_count(25)
    mark_document(page)
    pager = page.locator("#results .pagination")
    pager.get_by_role("link", name=re.compile(r"next", re.IGNORECASE)).click()
    expect(page).to_have_url(re.compile(r"[?&]page=2(&|$)"))
    expect(page.locator("#payouts-table tbody tr")).to_have_count(49 - 25)
    assert_same_document(page)

    # The pushed address is a real one: loading it shows the same page.
    page.reload()
    expect(page).to_have_url(re.compile(r"[?&]page=2(&|$)"))
    expect(page.locator("#payouts-table tbody tr")).to_have_count(49 - 25)


# --- replay ---------------------------------------------------------------------------------


def test_support_replays_a_failed_event_and_its_row_is_swapped_in_place(demo, page):
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    assert event.status == "failed"
    login(page, "support")
    open_failed_events(page)
    mark_document(page)
    row = event_row(page, REPLAY_ME)
    expect(row).to_have_attribute("id", f"event-{event.pk}")
    expect(row.locator(".badge")).to_have_text("failed")
    row.evaluate("tr => tr.dataset.before = 'yes'")  # gone once the row is replaced

    row.get_by_role("button", name=re.compile(r"^Replay evt_")).click()

    swapped = page.locator(f"#event-{event.pk}")
    expect(swapped).to_have_attribute("data-replayed", "applied")
    expect(swapped).not_to_have_attribute("data-before", "yes")
    expect(swapped.locator(".badge")).to_have_text("processed")
    expect(page.locator(f"#events-table tr[id='event-{event.pk}']")).to_have_count(1)
    # The row stayed where it was, among the other failed events.
    expect(event_row(page, UNKNOWN_PAID).locator(".badge")).to_have_text("failed")
    assert_same_document(page)

    event.refresh_from_db()
    assert event.status == WebhookEvent.Status.PROCESSED
    attempts = replay_attempts(event)
    assert len(attempts) == 1
    assert attempts[0].requested_by == User.objects.get(username="support")
    assert attempts[0].outcome == WebhookEventAttempt.Outcome.APPLIED
    assert payout_of(event).status == "paid"


def test_double_click_on_replay_applies_the_event_once(demo, page):
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    applied_before = payout_of(event).events_applied
    login(page, "support")
    open_failed_events(page)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)

    event_row(page, REPLAY_ME).get_by_role("button", name=f"Replay {REPLAY_ME}").dblclick()

    swapped = page.locator(f"#event-{event.pk}")
    expect(swapped).to_have_attribute("data-replayed", "applied")
    expect(swapped.locator(".badge")).to_have_text("processed")
    event.refresh_from_db()
    attempts = replay_attempts(event)
    assert [a.outcome for a in attempts].count(WebhookEventAttempt.Outcome.APPLIED) == 1
    assert len(posts) == 1, posts  # hx-disabled-elt disabled the button after the 1st click
    assert len(attempts) == 1
    assert payout_of(event).events_applied == applied_before + 1
    assert event.status == WebhookEvent.Status.PROCESSED


def test_two_staff_replaying_the_same_event_at_once_apply_it_once(
    demo, new_page: Callable[[], Page]
):
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    applied_before = payout_of(event).events_applied
    pages = [new_page(), new_page()]  # two browser contexts: two sessions of support
    for each in pages:
        login(each, "support")
        open_failed_events(each)

    # Hold both replay requests in the browsers and let them go together, so that the
    # server gets them at the same time (two workers, eight threads each).
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)
        if len(held) == len(pages):
            for waiting in held:
                waiting.continue_()

    for each in pages:
        each.route(f"**/events/{event.pk}/replay/", hold)
        event_row(each, REPLAY_ME).get_by_role("button", name=f"Replay {REPLAY_ME}").click()

    outcomes = []
    for each in pages:
        swapped = each.locator(f"#event-{event.pk}")
        expect(swapped).to_have_attribute("data-replayed", re.compile(r"\w+"))
        expect(swapped.locator(".badge")).to_have_text("processed")
        outcomes.append(swapped.get_attribute("data-replayed"))
    assert len(held) == 2
    assert sorted(outcomes).count("applied") == 1, outcomes

    attempts = replay_attempts(event)
    assert len(attempts) == 2
    assert [a.outcome for a in attempts].count(WebhookEventAttempt.Outcome.APPLIED) == 1
    assert payout_of(event).events_applied == applied_before + 1


# --- roles ----------------------------------------------------------------------------------


def test_manager_sees_no_replay_and_a_direct_replay_post_is_refused(demo, page):
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    attempts_before = event.attempts_log.count()
    applied_before = payout_of(event).events_applied
    login(page, "manager")
    open_failed_events(page)
    expect(event_row(page, REPLAY_ME)).to_be_visible()
    expect(page.get_by_role("button", name="Replay")).to_have_count(0)  # nor "Replay all/sel…"
    expect(page.locator("form#bulk-replay")).to_have_count(0)

    # The same POST the button would send, from the manager's session with a valid token.
    headers = {"X-CSRFToken": csrf_token(page)}
    answer = page.request.post(f"/events/{event.pk}/replay/", headers=headers)
    assert answer.status == 403
    assert "CSRF" not in answer.text()  # refused for the permission, not the token
    bulk = page.request.post("/events/replay/", headers=headers, form={"all_failed": "1"})
    assert bulk.status == 403

    event.refresh_from_db()
    assert event.status == WebhookEvent.Status.FAILED
    assert event.attempts_log.count() == attempts_before
    assert not replay_attempts(event)
    assert payout_of(event).events_applied == applied_before
    page.reload()
    expect(event_row(page, REPLAY_ME).locator(".badge")).to_have_text("failed")


# --- detail pages ---------------------------------------------------------------------------


def test_event_detail_of_a_failed_event_shows_the_payload_and_the_error(demo, page):
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    login(page, "support")
    open_failed_events(page)
    page.get_by_role("link", name=REPLAY_ME, exact=True).click()
    expect(page).to_have_url(re.compile(rf"/events/{event.pk}/$"))
    expect(page.locator("h1 .badge")).to_have_text("failed")

    payload = page.locator("#payload")
    expect(payload).to_contain_text(REPLAY_ME)
    text = payload.text_content() or ""
    assert json.loads(text)["id"] == REPLAY_ME
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False)  # pretty-printed
    assert f'\n  "id": "{REPLAY_ME}"' in text

    attempt = page.locator("#attempts-table tbody tr")
    expect(attempt).to_have_count(1)
    expect(attempt.locator(".badge")).to_have_text("failed")
    expect(attempt.locator("summary.error")).to_contain_text("OperationalError: terminating")
    attempt.locator("summary").click()
    expect(attempt.locator("details pre")).to_be_visible()
    expect(attempt.locator("details pre")).to_contain_text("(SQLSTATE 57P01)")


def test_payout_detail_of_a_failed_payout_shows_unpaid_items_and_the_failure(demo, page):
    payout = Payout.objects.filter(status="failed").order_by("stripe_payout_id").first()
    assert payout is not None
    login(page, "support")
    page.goto("/payouts/?status=failed")
    page.get_by_role("link", name=payout.stripe_payout_id).click()
    expect(page).to_have_url(re.compile(rf"/payouts/{payout.pk}/$"))
    expect(page.locator("h1 .badge")).to_have_text("failed")

    items = payout.payout_items.count()
    assert items > 0
    expect(page.locator("#items-table thead th").nth(5)).to_have_text("Paid out")
    expect(page.locator("#items-table tbody tr td:nth-child(6)")).to_have_text(["no"] * items)

    failed_step = page.locator("#timeline > li", has_text="payout.failed")
    expect(failed_step).to_have_count(1)
    expect(failed_step.locator(".tl-head .badge")).to_have_text("processed")
    expect(page.locator("#timeline > li strong")).to_have_text(
        ["payout.created", "payout.updated", "payout.paid", "payout.failed"])


# --- health and transaction logs ------------------------------------------------------------


def test_health_panels_and_transaction_stats_render(demo, page):
    login(page, "manager")
    page.locator("nav.main-nav").get_by_role("link", name="Health").click()
    expect(page.get_by_role("heading", name="Payout health")).to_be_visible()
    for panel, heading in [("backlog", "Event backlog"), ("stuck", "Stuck in transit"),
                           ("rejections", "Webhook rejections"), ("status", "Payouts by status"),
                           ("latency", "Processing latency")]:
        expect(page.locator(f"#panel-{panel} h2")).to_contain_text(heading)
    backlog = selectors.event_backlog()
    expect(page.locator("#panel-dead")).to_contain_text(f"{backlog.dead} dead")
    stuck_count, _ = selectors.stuck_in_transit()
    expect(page.locator("#panel-stuck .big")).to_have_text(str(stuck_count))
    expect(page.locator("#panel-status tbody tr")).to_have_count(
        len(selectors.payouts_by_status()))
    svg = page.locator("#panel-transactions svg.chart-plot")
    expect(svg).to_be_visible()
    expect(svg.locator("rect")).not_to_have_count(0)
    for chart in ("retries", "deadlocks"):  # bars, or a sentence when there were none
        expect(page.locator(f"#panel-{chart}").locator("svg.chart-plot, .chart-empty")
               ).to_be_visible()

    page.locator("nav.main-nav").get_by_role("link", name="Transactions").click()
    expect(page.get_by_role("heading", name="Transaction logs")).to_be_visible()
    stats = page.locator("#txstats")
    expect(stats.locator("thead th")).to_have_text(
        ["Operation", "Transactions", "p50", "p95", "p99", "Retry rate", "40001 seen",
         "40P01 seen", "Not committed"])
    process = stats.locator("tbody tr", has_text="webhook.process_event")
    expect(process).to_have_count(1)
    count = TransactionLog.objects.filter(operation="webhook.process_event").count()
    expect(process.locator("td").nth(1)).to_have_text(str(count))
    expect(page.locator("#txlogs-table tbody tr")).not_to_have_count(0)


# --- screenshots ----------------------------------------------------------------------------


def test_screenshots_of_the_main_pages(demo, page):
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    payout = Payout.objects.filter(status="failed").order_by("stripe_payout_id").first()
    assert payout is not None
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def shoot(name: str, path: str, ready: str) -> None:
        page.goto(path)
        expect(page.locator(ready).first).to_be_visible()
        target = SCREENSHOTS / f"{name}.png"
        target.unlink(missing_ok=True)
        page.screenshot(path=target, full_page=True)
        assert target.is_file() and target.stat().st_size > 0, target
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", target

    shoot("login", "/login/", "form button[type=submit]")
    login(page, "support")
    shoot("payouts", "/payouts/", "#payouts-table tbody tr")
    shoot("payout-detail", f"/payouts/{payout.pk}/", "#timeline > li")
    shoot("events", "/events/", "#events-table tbody tr")
    shoot("event-detail", f"/events/{event.pk}/", "#payload")
    shoot("transaction-logs", "/transactions/", "#txstats tbody tr")
    shoot("health", "/health/", "#panel-transactions svg")
    held = WebhookEvent.objects.get(stripe_event_id="evt_1DemoHeldAccount01")
    shoot("event-held", f"/events/{held.pk}/", "#held form.dismiss")
    reversed_ = Payout.objects.get(reversed_at__isnull=False)
    shoot("payout-reversed", f"/payouts/{reversed_.pk}/", "#reversed-by")
    # The same-second tie (seed_demo also marks a payout missing at Stripe for review).
    to_review = Payout.objects.get(review_reason__contains="came in the same second")
    shoot("payout-to-review", f"/payouts/{to_review.pk}/", "#review")


def test_support_dismisses_a_held_event_from_its_page(demo, page):
    """Held events are one click from the events list; dismissing one needs a reason,
    then the event is skipped and the page says so."""
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoHeldAccount01")
    login(page, "support")
    page.goto("/events/")
    page.locator("a#held-link").click()
    expect(page.locator("#results .count")).to_have_text("2 events")
    page.get_by_role("link", name="evt_1DemoHeldAccount01", exact=True).click()
    expect(page.locator("#held")).to_contain_text(
        "account is acct_1DemoBlueHeron0000 in the event, acct_1DemoAtelierNord00 on our payout")
    page.get_by_label("Why it is dismissed").fill("Blue Heron's payout; confirmed with Stripe")
    page.get_by_role("button", name="Dismiss").click()
    expect(page.locator("#messages")).to_contain_text("dismissed: it stays on record as skipped")
    expect(page.locator("h1 .badge")).to_have_text("skipped")
    expect(page.locator("#attempts-table")).to_contain_text("dismiss")
    event.refresh_from_db()
    assert event.status == "skipped" and "confirmed with Stripe" in event.status_reason


# --- product bugs (these fail until the console is fixed) -----------------------------------


def test_replay_leaves_the_address_bar_on_the_events_list(demo, page):
    """A replay does not push its POST-only URL: the page can still be reloaded."""
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    login(page, "support")
    open_failed_events(page)
    list_url = page.url
    event_row(page, REPLAY_ME).get_by_role("button", name=f"Replay {REPLAY_ME}").click()
    expect(page.locator(f"#event-{event.pk}")).to_have_attribute("data-replayed", "applied")
    assert page.url == list_url
    answer = page.reload()
    assert answer is not None and answer.status == 200


def test_a_replayed_row_keeps_its_replay_button(demo, page):
    """The swapped row has its Replay button again, so a replay that failed can be retried."""
    event = WebhookEvent.objects.get(stripe_event_id=UNKNOWN_PAID)  # replay: still failing
    login(page, "support")
    open_failed_events(page)
    event_row(page, UNKNOWN_PAID).get_by_role("button", name=f"Replay {UNKNOWN_PAID}").click()
    swapped = page.locator(f"#event-{event.pk}")
    expect(swapped).to_have_attribute("data-replayed", "retry")
    expect(swapped.locator(".badge")).to_have_text("failed")
    # The swapped row is complete now: count at once instead of waiting for a button.
    replay = swapped.get_by_role("button", name=f"Replay {UNKNOWN_PAID}")
    assert replay.count() == 1, swapped.inner_html()
