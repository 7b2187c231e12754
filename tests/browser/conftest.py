"""Browser tests: the console served by gunicorn, driven by Debian's chromium through Playwright.

The server runs in its own process against the pytest test database, so the tests
use ``@pytest.mark.django_db(transaction=True)``: what a test writes is committed,
and the server sees it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import pytest
from django.core.management import call_command
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.payouts.helpers import ARTIFACTS, Server

# The session's chromium (fixtures ``playwright_driver`` and ``browser``) is launched in
# tests/conftest.py: one per run, shared with the browser tests of tests/security.

SCREENSHOTS = ARTIFACTS / "screenshots"
TIMEOUT_MS = 15_000  # generous for a loaded machine; expect() returns as soon as it holds

DEMO_LOGINS = {  # from payouts/management/commands/seed_demo.py
    "support": "support-demo-password",
    "manager": "manager-demo-password",
    "admin": "admin-demo-password",
}

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
def demo(transactional_db: None) -> None:
    """The demo data and logins of ``manage.py seed_demo`` (which also restores the roles
    the flush after each transactional test removes), committed for the server to see."""
    logging.disable(logging.INFO)  # ~170 events processed: keep failure reports readable
    try:
        call_command("seed_demo", stdout=io.StringIO())
    finally:
        logging.disable(logging.NOTSET)


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


@pytest.fixture
def new_page(browser: Browser, inline_server: Server,
             request: pytest.FixtureRequest) -> Iterator[Callable[[], Page]]:
    """``new_page()``: a page in a fresh browser context (own cookies), on the console."""
    contexts: list[BrowserContext] = []

    def make() -> Page:
        context = browser.new_context(base_url=inline_server.url,
                                      viewport={"width": 1280, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        return context.new_page()

    yield make
    if request.node.stash.get(_FAILED, False):  # keep what the browser showed
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for n, context in enumerate(contexts):
            for m, shown in enumerate(context.pages):
                shown.screenshot(path=SCREENSHOTS / f"FAILED-{request.node.name}-{n}{m}.png",
                                 full_page=True)
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page: Callable[[], Page]) -> Page:
    """A page in a fresh browser context for this test."""
    return new_page()


def login(page: Page, username: str, password: str | None = None) -> None:
    """Log in through the login form; returns once the console shows the user."""
    page.goto("/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password or DEMO_LOGINS[username])
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("header.topbar .user")).to_contain_text(username)
