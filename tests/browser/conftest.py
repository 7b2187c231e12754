"""Browser tests: the console served by gunicorn, driven by Debian's chromium through Playwright.

The server runs in its own process against the pytest test database, so the tests
use ``@pytest.mark.django_db(transaction=True)``: what a test writes is committed,
and the server sees it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.payouts.helpers import ARTIFACTS, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
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


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    # Playwright's sync API keeps an asyncio loop running in this thread, and Django then
    # refuses database calls from it; the test code itself is synchronous throughout.
    # (Only this process: server_env() drops DJANGO_* variables for the server.)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        driver = sync_playwright().start()
        yield driver
        driver.stop()


@pytest.fixture(scope="session")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium "
                    "(apt-get install chromium)", pytrace=False)
    try:
        launched = playwright_driver.chromium.launch(executable_path=str(CHROMIUM),
                                                     args=CHROMIUM_ARGS)
    except PlaywrightError as exc:
        pytest.fail(f"{CHROMIUM} did not start ({exc}); is Debian's chromium installed and "
                    "working? (apt-get install chromium)", pytrace=False)
    yield launched
    launched.close()


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
