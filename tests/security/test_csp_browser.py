"""No page needs the Content-Security-Policy relaxed: chromium loads the console's pages
(DEBUG off, the production CSP) and reports not one violation, also after htmx swaps.
Only a browser can tell: it is what refuses an inline script or style."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from payouts.models import Payout, WebhookEvent
from tests.browser.conftest import TIMEOUT_MS, demo, login  # noqa: F401 (the fixture)
from tests.payouts.helpers import Server

pytestmark = pytest.mark.django_db(transaction=True)

# Every violation, as the page sees it (installed before any page script runs).
LISTEN = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`);
});
"""


class Watched:
    """A page whose CSP violations are collected: the page's own events, and chromium's
    console errors ("Refused to ...")."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        page.add_init_script(LISTEN)
        page.on("console", lambda message: self.console.append(message.text)
                if "Content Security Policy" in message.text else None)

    def violations(self) -> list[str]:
        return [*self.page.evaluate("window.__csp"), *self.console]

    def visit(self, path: str) -> list[str]:
        response = self.page.goto(path)
        assert response is not None and response.ok, (path, response and response.status)
        assert response.headers.get("content-security-policy"), path
        self.page.wait_for_load_state("load")
        return self.violations()


@pytest.fixture
def watched(browser: Browser, inline_server: Server) -> Iterator[Watched]:
    context = browser.new_context(base_url=inline_server.url)
    context.set_default_timeout(TIMEOUT_MS)
    yield Watched(context.new_page())
    context.close()


def test_the_detector_sees_an_inline_style(demo, watched):  # noqa: F811
    """The check below is not vacuous: an inline style attribute is refused and seen."""
    watched.visit("/login/")
    watched.page.evaluate(
        "document.body.insertAdjacentHTML('beforeend', '<p style=\"color: red\">x</p>')")
    expect(watched.page.locator("p", has_text="x")).to_have_count(1)
    watched.page.wait_for_function("window.__csp.length > 0")
    assert any("style-src" in v for v in watched.violations())


def test_supports_pages_and_htmx_swaps_raise_no_csp_violation(demo, watched):  # noqa: F811
    page = watched.page
    assert watched.visit("/login/") == []
    login(page, "support")
    payout = Payout.objects.filter(status="failed").first()
    event = WebhookEvent.objects.filter(status="failed").first()
    assert payout is not None and event is not None
    for path in ["/payouts/", f"/payouts/{payout.pk}/", "/events/", f"/events/{event.pk}/",
                 "/events/?status=held", "/transactions/", "/health/", "/reconciliation/",
                 "/seller-payouts/"]:
        assert watched.visit(path) == [], path
    # htmx at work: a filter swaps the results in place.
    watched.visit("/payouts/")
    page.get_by_label("Status").select_option("failed")
    expect(page).to_have_url(re.compile(r"[?&]status=failed"))
    assert watched.violations() == []


def test_the_admin_raises_no_csp_violation(demo, watched):  # noqa: F811
    login(watched.page, "admin")
    event = WebhookEvent.objects.first()
    payout = Payout.objects.first()
    assert event is not None and payout is not None
    for path in ["/admin/", "/admin/payouts/webhookevent/",
                 f"/admin/payouts/webhookevent/{event.pk}/change/", "/admin/payouts/payout/",
                 f"/admin/payouts/payout/{payout.pk}/change/",
                 "/admin/auth/user/", "/admin/auth/user/add/"]:
        assert watched.visit(path) == [], path


def test_confirmations_and_one_shot_forms_work_without_inline_handlers(demo, watched):  # noqa: F811
    """What inline onclick handlers did, console.js does: a refused confirmation posts
    nothing, an accepted one posts the form once."""
    page = watched.page
    login(page, "support")
    watched.visit("/events/")
    failed = WebhookEvent.objects.filter(status="failed").count()
    button = page.get_by_role("button", name=f"Replay all failed ({failed})")
    questions: list[str] = []

    def answer(accept: bool):  # type: ignore[no-untyped-def]
        def handle(dialog):  # type: ignore[no-untyped-def]
            questions.append(dialog.message)
            if accept:
                dialog.accept()
            else:
                dialog.dismiss()
        return handle

    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.once("dialog", answer(False))
    button.click()
    page.wait_for_timeout(300)
    assert questions == [f"Replay all {failed} failed events?"] and posts == []
    page.once("dialog", answer(True))
    with page.expect_navigation():
        button.click()
    assert len(questions) == 2 and len(posts) == 1 and posts[0].endswith("/events/replay/")
    assert watched.violations() == []
