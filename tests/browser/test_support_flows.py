"""What support staff and managers reach for first, in a real browser: where each role
lands, the Needs attention page, replay feedback that lasts, phones and keyboards, and an
accessibility check (axe-core) of every page.

Screenshots of each page, at desktop width and at 390 px, go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import re

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Page, Route, expect

from payouts import selectors
from payouts.models import Payout, WebhookEvent, WebhookEventAttempt
from tests.browser.conftest import SCREENSHOTS, login

pytestmark = pytest.mark.django_db(transaction=True)

REPLAY_ME = "evt_1DemoReplayMe01"  # a failed payout.paid of Cedar & Clay; a replay applies it
PHONE = {"width": 390, "height": 844}


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def badge_count(page: Page) -> int:
    badge = page.locator("#attention-badge")
    return int(badge.inner_text().split()[0]) if badge.is_visible() else 0


def count_is(n: int) -> re.Pattern[str]:
    return re.compile(rf"^{n}\b")


def test_each_role_lands_where_its_work_is(demo, page: Page, new_page) -> None:
    login(page, "support")
    expect(page).to_have_url(re.compile(r"/attention/$"))
    counts = selectors.attention()
    assert counts.total > 0
    expect(page.locator("#attention-badge")).to_have_text(count_is(counts.total))
    expect(page.locator("#attention-counts")).to_contain_text(f"{counts.held} held")
    expect(page.locator("#attention-counts")).to_contain_text(f"{counts.dead} dead")
    # held first, then dead, then failed
    statuses = page.locator("#events-table tbody tr td:nth-child(3) .badge").all_inner_texts()
    order = {"held": 0, "dead": 1, "failed": 2}
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)
    shot(page, "attention-support")

    manager = new_page()
    login(manager, "manager")
    expect(manager).to_have_url(re.compile(r"/health/$"))


def test_support_finds_a_sellers_failed_event_and_the_replay_stays_on_its_row(
        demo, page: Page) -> None:
    """From the landing page: search the seller by part of its name, replay in place; the
    row keeps who replayed it and the outcome, the badge and counts follow."""
    login(page, "support")
    before = badge_count(page)
    page.get_by_role("link", name=re.compile("^Events")).click()
    page.get_by_label("Search").fill("cedar")
    expect(page).to_have_url(re.compile(r"q=cedar"))  # the search swapped the results
    sellers = page.locator("#events-table tbody tr td:nth-child(6)").all_inner_texts()
    assert sellers and set(sellers) == {"Cedar & Clay"}, sellers
    row = page.locator("#events-table tbody tr", has_text=REPLAY_ME)
    row.get_by_role("button", name=f"Replay {REPLAY_ME}").click()
    expect(row.locator(".by")).to_contain_text("replayed by support")
    expect(row.locator(".by")).to_contain_text("applied")
    expect(page.locator("#messages li.msg-success")).to_contain_text(
        f"{REPLAY_ME} replayed: applied")
    # the event no longer failed, and its payout (past its arrival date) no longer stuck
    after = selectors.attention().total
    assert after < before
    expect(page.locator("#attention-badge")).to_have_text(count_is(after))
    expect(row.get_by_role("button", name=f"Replay {REPLAY_ME}")).to_have_count(0)
    shot(page, "events-after-replay")

    page.reload()  # the outcome outlives the page
    row = page.locator("#events-table tbody tr", has_text=REPLAY_ME)
    expect(row.locator(".by")).to_contain_text("replayed by support")
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    assert event.status == WebhookEvent.Status.PROCESSED
    assert Payout.objects.get(stripe_payout_id=event.stripe_object_id).status == "paid"


def test_a_replay_on_needs_attention_redraws_its_row_and_counts_in_place(demo, page: Page):
    login(page, "support")
    counts = selectors.attention()
    row = page.locator("#events-table tbody tr", has_text=REPLAY_ME)
    cells = row.locator("td").count()
    row.get_by_role("button", name=f"Replay {REPLAY_ME}").click()
    expect(row.locator(".by")).to_contain_text("replayed by support")
    assert row.locator("td").count() == cells
    assert page.locator("#events-table thead th").count() == cells
    expect(page.locator("#attention-counts")).to_contain_text(f"{counts.failed - 1} failed")
    expect(page.locator("#attention-badge")).to_have_text(count_is(selectors.attention().total))


def test_bulk_replay_needs_a_selection_and_says_how_many(demo, page: Page) -> None:
    login(page, "support")
    page.goto("/events/?status=held")
    button = page.get_by_role("button", name=re.compile("^Replay selected"))
    expect(button).to_be_disabled()
    boxes = page.locator('#events-table tbody input[type="checkbox"][name="event_ids"]')
    assert boxes.count() >= 2
    boxes.nth(0).check()
    boxes.nth(1).check()
    expect(button).to_be_enabled()
    expect(button).to_have_text("Replay selected (2)")
    assert button.get_attribute("data-confirm") == "Replay the 2 selected events?"
    preview = page.get_by_role("button", name=re.compile("^Preview selected"))
    expect(preview).to_have_text("Preview selected (2)")
    assert preview.get_attribute("data-confirm") is None  # previews change nothing: no question
    page.once("dialog", lambda dialog: dialog.accept())
    button.click()
    # a job of exactly those two, run by the workers; its page shows the progress
    expect(page).to_have_url(re.compile(r"/bulk-replays/\d+/$"))
    expect(page.locator("#messages")).to_contain_text("Bulk replay of 2 events queued")


def test_a_server_error_during_a_replay_is_shown(demo, page: Page) -> None:
    login(page, "support")
    page.goto("/events/?status=failed")

    def fail(route: Route) -> None:
        route.fulfill(status=500, body="boom")

    page.route(re.compile(r"/events/\d+/replay/$"), fail)
    page.locator("#events-table tbody tr").first.get_by_role(
        "button", name=re.compile("^Replay ")).click()
    expect(page.locator("#messages li.msg-error")).to_contain_text("HTTP 500")
    assert not WebhookEventAttempt.objects.filter(trigger="replay").exists()


PAGES = {  # (who, path): every page a role opens
    "attention": ("support", "/attention/"),
    "events": ("support", "/events/"),
    "event": ("support", None),  # the event page of REPLAY_ME
    "payouts": ("support", "/payouts/"),
    "payout": ("support", None),  # its payout
    "seller-payouts": ("support", "/seller-payouts/"),
    "transactions": ("support", "/transactions/"),
    "reconciliation": ("support", "/reconciliation/"),
    "health": ("manager", "/health/"),
    "audit": ("manager", "/audit/"),
    "bulk-replays": ("support", "/bulk-replays/"),
}


def page_path(name: str, path: str | None) -> str:
    event = WebhookEvent.objects.get(stripe_event_id=REPLAY_ME)
    if name == "event":
        return f"/events/{event.pk}/"
    if name == "payout":
        return f"/payouts/{Payout.objects.get(stripe_payout_id=event.stripe_object_id).pk}/"
    assert path
    return path


def test_every_page_fits_a_phone_and_passes_axe(demo, new_page) -> None:
    """At 390 px no page scrolls sideways (wide tables scroll in their box); axe-core finds
    no serious or critical violation, at desktop width or on a phone."""
    axe = Axe()
    pages = {who: new_page() for who in ("support", "manager")}
    for who, page in pages.items():
        login(page, who)
    problems: list[str] = []
    for name, (who, path) in PAGES.items():
        page = pages[who]
        for width, viewport in (("desktop", {"width": 1280, "height": 900}), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.goto(page_path(name, path))
            expect(page.locator("main h1")).to_be_visible()
            shot(page, f"{name}-{width}")
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth")
            if overflow > 0:
                problems.append(f"{name} ({width}): the page scrolls sideways by {overflow} px")
            found = axe.run(page).response["violations"]
            problems += [f"{name} ({width}): {v['impact']} {v['id']}: {v['help']} "
                         f"({len(v['nodes'])} nodes, e.g. {v['nodes'][0]['target']})"
                         for v in found if v["impact"] in ("serious", "critical")]
    assert not problems, "\n".join(problems)


def test_keyboard_users_can_skip_the_navigation(demo, page: Page) -> None:
    login(page, "support")
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    expect(page.locator("main#content")).to_be_focused()
