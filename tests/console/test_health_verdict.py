"""Health's verdict (console/verdict.py), its cards and "View all" links, and its charts."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from console import charts
from payouts.models import Payout, WebhookEvent
from payouts.roles import ensure_roles
from tests.factories import make_payout

pytestmark = pytest.mark.django_db

_serial = itertools.count(1)


def manager() -> Client:
    ensure_roles(Group, Permission)
    user = User.objects.create_user(f"manager{next(_serial)}", password="x" * 12)
    user.groups.add(Group.objects.get(name="Managers"))
    client = Client()
    client.force_login(user)
    return client


def event(status: str, *, received_ago: timedelta = timedelta(0), **fields: object,
          ) -> WebhookEvent:
    """An event row in ``status``, received ``received_ago`` (the inbox's columns only)."""
    now = timezone.now()
    row = WebhookEvent.objects.create(
        stripe_event_id=f"evt_health{next(_serial):06d}", type="payout.paid",
        stripe_created=now, raw_body=b"{}", status=status, **fields)
    WebhookEvent.objects.filter(pk=row.pk).update(received_at=now - received_ago)
    return row


def stuck_payout() -> Payout:
    payout = make_payout(status="in_transit")
    Payout.objects.filter(pk=payout.pk).update(arrival_date=timezone.now() - timedelta(days=2))
    return payout


def health(client: Client | None = None) -> tuple[object, str]:
    response = (client or manager()).get(reverse("health"))
    assert response.status_code == 200
    return response.context["verdict"], response.content.decode()


def test_an_empty_ledger_is_all_clear():
    verdict, page = health()
    assert verdict.level.title == "All clear" and verdict.findings == []
    assert '<section class="verdict verdict-ok" id="verdict">' in page
    assert "<h2>All clear</h2>" in page and "Every check is within its threshold." in page
    assert page.count('<span class="state state-ok">OK</span>') == len(verdict.checks)
    assert " UTC</time>" in page and "As of" in page
    # nothing happened: a sentence, not an empty chart
    assert "No transactions in the last 24 hours." in page and "<svg" not in page


@pytest.mark.parametrize(("status", "key", "rule", "found"), [
    ("held", "held_events", "needs attention when any event is held for a decision",
     "1 held event"),
    ("dead", "dead_events", "needs attention when any event is dead", "1 dead event"),
])
def test_a_held_or_dead_event_needs_attention_and_names_its_rule(status, key, rule, found):
    event(status)
    verdict, page = health()
    assert verdict.level.title == "Needs attention"
    assert [f.key for f in verdict.findings] == [key]
    assert '<section class="verdict verdict-warn" id="verdict">' in page
    assert f"{found}</a> <span class=\"rule\">({rule})</span>" in page
    card = page[page.index(f'id="panel-{status}"'):]
    assert card.index('<span class="state state-warn">Needs attention</span>') < card.index(
        "</section>")


def test_an_old_due_event_means_degraded(settings):
    settings.HEALTH_OLDEST_DUE_SECONDS = 300
    event("received", received_ago=timedelta(minutes=12), next_attempt_at=timezone.now())
    verdict, page = health()
    assert verdict.level.title == "Degraded"
    [finding] = verdict.findings
    assert finding.key == "oldest_due"
    assert finding.rule == "degraded when the oldest due event waits over 5 min"
    assert finding.summary == "1 due, the oldest waiting 12 min"
    assert '<section class="verdict verdict-degraded" id="verdict">' in page
    assert "<h2>Degraded</h2>" in page and finding.rule in page


def test_a_due_event_younger_than_the_threshold_is_fine():
    event("failed", received_ago=timedelta(minutes=2), next_attempt_at=timezone.now())
    verdict, _ = health()
    assert verdict.checks["oldest_due"].level == 0 and verdict.level.title == "All clear"


def test_a_slow_p99_needs_attention(settings):
    settings.HEALTH_P99_SECONDS = 1
    event("processed", received_ago=timedelta(seconds=30), processed_at=timezone.now())
    verdict, page = health()
    assert [f.key for f in verdict.findings] == ["latency_p99"]
    rule = "needs attention when processing p99 is over 1 s (24 h)"
    assert verdict.findings[0].rule == rule and f"({rule})" in page


def test_each_view_all_link_lists_exactly_the_count_on_its_card():
    client = manager()
    stuck = [stuck_payout() for _ in range(7)]
    make_payout(status="in_transit")  # in transit, but not past its arrival date
    Payout.objects.filter(pk=stuck[0].pk).update(review_reason="same second")
    for _ in range(2):
        event("dead")
    event("held")
    for _ in range(3):
        event("received", received_ago=timedelta(minutes=10), next_attempt_at=timezone.now())
    event("failed", next_attempt_at=timezone.now() + timedelta(hours=1))  # waiting, not due

    verdict, page = health(client)
    counts = {key: check.count for key, check in verdict.checks.items() if check.count}
    assert counts == {"stuck_in_transit": 7, "dead_events": 2, "held_events": 1,
                      "oldest_due": 3, "to_review": 1}
    for key, count in counts.items():
        check = verdict.checks[key]
        link = f'<a class="view-all" href="{check.url}">View all {count}</a>'
        assert link.replace("&", "&amp;") in page, key
        listed = client.get(check.url).context["table"].paginator.count
        assert listed == count, key
    # the card lists the first five; the link shows the other two as well
    card = page[page.index('id="panel-stuck"'):]
    assert card[:card.index("</section>")].count("/payouts/") == 5 + 1


def test_the_stuck_filter_is_offered_on_the_payouts_list():
    page = manager().get(reverse("payout-list")).content.decode()
    assert '<option value="stuck">stuck in transit</option>' in page


def test_health_tables_have_column_headers_and_amounts_on_the_right():
    make_payout(status="paid", amount_each=123456)
    _, page = health()
    status = page[page.index('id="panel-status"'):]
    status = status[:status.index("</section>")]
    assert '<th scope="col" class="num">Amount</th>' in status
    assert '<td class="num">3,703.68 USD</td>' in status
    for panel in ("rejections", "stripe-sync", "failure-codes", "seller-failures"):
        card = page[page.index(f'id="panel-{panel}"'):]
        assert '<th scope="col"' in card[:card.index("</section>")], panel


def test_an_hourly_chart_has_labelled_axes_and_readable_text():
    start = datetime(2026, 11, 29, 0, tzinfo=UTC)
    series = [(start + timedelta(hours=h), 3 if h == 14 else 0) for h in range(24)]
    svg = charts.hourly_chart(series, unit="retries per hour", empty="No retries.")
    assert '<p class="chart-unit">retries per hour</p>' in svg  # the y axis's unit
    assert '<div class="chart-y" aria-hidden="true"><span>3</span><span>0</span></div>' in svg
    ticks = ["00:00", "06:00", "12:00", "18:00"]
    assert [t for t in ticks if f">{t}</text>" in svg] == ticks  # the x axis's hours
    assert "hour (UTC)" in svg
    assert "<title>14:00 to 15:00 UTC: 3 retries per hour</title>" in svg
    assert "viewBox" not in svg and "font-size" not in svg  # text is sized by CSS, 12 px
    assert charts.hourly_chart(series[:3], unit="x", empty="No retries.") == (
        '<p class="chart-empty muted">No retries.</p>')
    assert "No retries." in charts.hourly_chart([], unit="x", empty="No retries.")
