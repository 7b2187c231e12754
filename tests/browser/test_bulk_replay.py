"""A bulk replay in a real browser: a row previewed, then all matching events asked for
from the events list, run by a worker process, its progress page polled to the end, with
screenshots and no Content-Security-Policy refusal."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from payouts.models import BulkReplay, WebhookEvent
from tests.browser.conftest import SCREENSHOTS, login
from tests.payouts.helpers import start_worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_support_replays_all_matching_events_and_watches_the_job_finish(demo, page: Page,
                                                                      worker_env):
    matching = WebhookEvent.objects.filter(type="payout.paid").count()
    assert matching > 10
    refused: list[str] = []  # what the Content-Security-Policy blocked, if anything
    page.on("console", lambda msg: refused.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    login(page, "support")
    page.goto("/events/?type=payout.paid")
    # A row's Preview swaps what a replay would do into the panel, changing nothing (only
    # events a replay can change have one).
    page.get_by_role("button", name=re.compile(r"^Preview a replay of")).first.click()
    expect(page.locator("#preview-panel #preview-table tbody tr")).to_have_count(1)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "bulk-replay-preview.png", full_page=False)
    button = page.get_by_role("button", name=f"Replay all matching ({matching})")
    questions: list[str] = []

    def accept(dialog):  # type: ignore[no-untyped-def]
        questions.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    with page.expect_navigation():
        button.click()
    assert questions == [f"Replay all {matching} matching events?"]
    job = BulkReplay.objects.get()
    expect(page).to_have_url(re.compile(rf"/bulk-replays/{job.pk}/$"))
    expect(page.locator("#progress")).to_have_attribute("data-status", "queued")
    expect(page.get_by_role("button", name="Cancel")).to_be_visible()

    worker = start_worker(worker_env, "--idle-sleep", "0.2")
    try:
        # htmx polls the progress every second until the job is done.
        expect(page.locator("#progress")).to_have_attribute("data-status", "done",
                                                            timeout=60_000)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    expect(page.locator("#progress-count")).to_contain_text(f"{matching} / {matching}")
    expect(page.locator("#progress-bar")).to_have_attribute("value", str(matching))
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)  # nothing to cancel
    job.refresh_from_db()
    assert (job.status, job.done, job.total) == ("done", matching, matching)
    assert sum(job.counts.values()) == matching
    assert refused == []

    target = SCREENSHOTS / "bulk-replay-done.png"
    target.unlink(missing_ok=True)
    page.screenshot(path=target, full_page=True)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
