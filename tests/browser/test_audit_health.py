"""Health's verdict and the audit trail in a real browser: readable, and no sideways
scrolling on a phone (390 px). Screenshots in test-artifacts/screenshots/."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import Page, expect

from payouts import selectors
from payouts.models import WebhookEvent
from payouts.services import inbox
from payouts.services.processing import event_replay
from tests.browser.conftest import SCREENSHOTS, login

pytestmark = pytest.mark.django_db(transaction=True)

# The smallest font size of any element with text of its own, in CSS pixels.
SMALLEST_TEXT = """root => Math.min(...Array.from(root.querySelectorAll('*'))
  .filter(el => Array.from(el.childNodes).some(n => n.nodeType === 3 && n.textContent.trim()))
  .filter(el => el.getClientRects().length)
  .map(el => parseFloat(getComputedStyle(el).fontSize)))"""


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def assert_no_sideways_scroll(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], f"{page.url} is {width} px wide"


def test_a_manager_reads_the_health_verdict_and_the_audit_trail(demo, page):
    support = User.objects.get(username="support")
    replayed = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    event_replay(event_id=replayed.pk, requested_by=support)
    dismissed = WebhookEvent.objects.get(stripe_event_id="evt_1DemoHeldAmount01")
    inbox.event_dismiss(event_id=dismissed.pk, requested_by=support,
                        reason="Confirmed with Stripe: the amount was corrected there")

    login(page, "manager")
    page.locator("nav.main-nav").get_by_role("link", name="Health").click()
    verdict = page.locator("#verdict")
    # seed_demo has a dead event, a held one, payouts stuck and to review
    expect(verdict.get_by_role("heading")).to_have_text("Needs attention")
    expect(verdict).to_contain_text("needs attention when any event is dead")
    expect(page.locator("#panel-dead .state")).to_have_text("Needs attention")
    expect(page.locator("#panel-transactions svg.chart-plot rect")).not_to_have_count(0)
    assert page.locator("#health").evaluate(SMALLEST_TEXT) >= 12
    shoot(page, "health-verdict")

    stuck_count, _ = selectors.stuck_in_transit()
    page.locator("#panel-stuck").get_by_role("link", name=f"View all {stuck_count}").click()
    expect(page.locator("#results .count")).to_have_text(f"{stuck_count} payouts")

    page.locator("nav.main-nav").get_by_role("link", name="Audit").click()
    rows = page.locator("#audit-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("Confirmed with Stripe")
    expect(rows.nth(1)).to_contain_text("evt_1DemoReplayMe01")
    expect(rows.nth(1)).to_contain_text("in_transit → paid")
    exact = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")  # on hover
    expect(rows.nth(1).locator("time")).to_have_attribute("title", exact)
    assert page.locator("main").evaluate(SMALLEST_TEXT) >= 12
    shoot(page, "audit")

    page.set_viewport_size({"width": 390, "height": 844})
    for path, name in (("/health/", "health-390"), ("/audit/", "audit-390")):
        page.goto(path)
        expect(page.locator("h1")).to_be_visible()
        assert_no_sideways_scroll(page)
        shoot(page, name)
