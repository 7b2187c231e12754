"""What the console takes from the address bar and forms, against a real server (gunicorn,
DEBUG off): page sizes are capped, and ``next`` never leads off the site.

The probes from the issue: "`?per_page=30000` on a list page took 50 s and 27 MB;
`?per_page=-5` is a 500"; "After a replay, `next=https://evil.example/x` redirects off
site".
"""

from __future__ import annotations

import re
import time

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from console.inputs import MAX_PER_PAGE, PER_PAGE, page_size, safe_next
from payouts.models import Payout, TransactionLog, WebhookEvent
from tests.payouts.helpers import deliver, payout_event
from tests.security.visitor import Visitor

PASSWORD = "correct horse battery staple"
ROWS = 130  # more than the largest page


def rows(html: str, table_id: str) -> int:
    body = html.split(f'id="{table_id}"', 1)[1].split("<tbody", 1)[1].split("</tbody>", 1)[0]
    return len(re.findall(r"<tr\b", body))


@pytest.fixture
def root(inline_server) -> Visitor:  # type: ignore[no-untyped-def]
    User.objects.create_superuser("root", password=PASSWORD)
    visitor = Visitor(inline_server.url)
    assert visitor.login("root", PASSWORD).status_code == 302
    return visitor


@pytest.fixture
def payouts(transactional_db: None) -> None:
    Payout.objects.bulk_create(
        Payout(stripe_payout_id=f"po_cap{n:05d}", amount=100, currency="usd")
        for n in range(ROWS))


# --- page sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "size"), [
    ("30000", PER_PAGE), ("101", PER_PAGE), ("100", 100), ("10", 10), ("1", 1),
    ("0", PER_PAGE), ("-5", PER_PAGE), ("abc", PER_PAGE), ("1e3", PER_PAGE), ("", PER_PAGE),
    (None, PER_PAGE), ("9" * 5000, PER_PAGE),
])
def test_page_size(value, size):
    assert page_size(value) == size


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("query", "shown"), [
    ("per_page=30000", PER_PAGE),
    ("per_page=100", MAX_PER_PAGE),
    ("per_page=-5", PER_PAGE),
    ("per_page=0", PER_PAGE),
    ("per_page=abc", PER_PAGE),
    ("per_page=50&page=-3", 50),  # a page that does not exist: the last one
    ("per_page=50&page=abc", 50),
    ("per_page=50&page=99999", ROWS - 2 * 50),
])
def test_a_list_page_shows_at_most_100_rows_whatever_the_query(root, payouts, query, shown):
    started = time.monotonic()
    response = root.get(f"/payouts/?{query}")
    assert response.status_code == 200
    assert rows(response.text, "payouts-table") == shown
    assert f"{ROWS} payouts" in response.text
    assert time.monotonic() - started < 10


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/payouts/", "/events/", "/transactions/"])
@pytest.mark.parametrize("per_page", ["-5", "abc", "30000"])
def test_every_list_page_takes_a_bad_page_size(root, path, per_page):
    assert root.get(f"{path}?per_page={per_page}").status_code == 200
    htmx = root.get(f"{path}?per_page={per_page}", headers={"HX-Request": "true"})
    assert htmx.status_code == 200


@pytest.mark.django_db(transaction=True)
def test_the_events_and_transaction_lists_are_capped_too(root):
    WebhookEvent.objects.bulk_create(
        WebhookEvent(stripe_event_id=f"evt_cap{n:05d}", type="payout.paid", raw_body=b"{}",
                     stripe_created=timezone.now(), status="processed")
        for n in range(ROWS))
    assert rows(root.get("/events/?per_page=30000").text, "events-table") == PER_PAGE
    assert rows(root.get("/events/?per_page=100").text, "events-table") == MAX_PER_PAGE
    TransactionLog.objects.bulk_create(
        TransactionLog(operation="test", isolation_level="serializable", attempts=1,
                       duration_ms=1.0, outcome="committed", started_at=timezone.now())
        for _ in range(ROWS))
    assert rows(root.get("/transactions/?per_page=30000").text, "txlogs-table") == PER_PAGE


# --- next ----------------------------------------------------------------------------------


OFF_SITE = ["https://evil.example/x", "//evil.example/x", "http://evil.example",
            "/\\evil.example/x", "\\\\evil.example", "https:evil.example",
            "javascript:alert(1)", " https://evil.example/x"]


@pytest.mark.parametrize("target", OFF_SITE)
def test_safe_next_refuses_other_sites(rf, target):
    request = rf.post("/events/1/replay/", {"next": target})
    assert safe_next(request, "/events/1/") == "/events/1/"


def test_safe_next_keeps_a_local_page(rf):
    request = rf.post("/events/1/replay/", {"next": "/events/?status=failed&page=2"})
    assert safe_next(request, "/events/1/") == "/events/?status=failed&page=2"


@pytest.fixture
def failed_event(inline_server) -> WebhookEvent:  # type: ignore[no-untyped-def]
    """A delivered event that waits (its payout is unknown): replaying it changes nothing."""
    event = payout_event("payout.paid", "po_nobody_knows_it", created=int(time.time()),
                         account="acct_nobody", amount=100, currency="usd")
    assert deliver(inline_server.url, event).status == 200
    return WebhookEvent.objects.get(stripe_event_id=event["id"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("target", OFF_SITE)
def test_after_a_replay_next_never_leads_off_site(root, failed_event, target):
    replay = root.post(f"/events/{failed_event.pk}/replay/", {"next": target})
    assert replay.status_code == 302
    assert replay.headers["Location"] == f"/events/{failed_event.pk}/"
    # A bulk replay goes to its own page, whatever next says.
    bulk = root.post("/events/replay/", {"scope": "selected", "event_ids": [failed_event.pk],
                                         "next": target})
    assert bulk.status_code == 303
    assert bulk.headers["Location"].startswith("/bulk-replays/")


@pytest.mark.django_db(transaction=True)
def test_after_a_replay_a_local_next_is_followed(root, failed_event):
    back = "/events/?status=failed"
    replay = root.post(f"/events/{failed_event.pk}/replay/", {"next": back})
    assert replay.headers["Location"] == back
