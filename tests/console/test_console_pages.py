"""Every console page, for every role, on the demo data: who may see what.

The demo data is loaded once for the module (committed); each test runs in a
transaction rolled back at its end, so tests only read it. Replays, which
write, are tested in test_console_replay.py.
"""

import io
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from payouts.models import Payout, WebhookEvent
from tests.factories import make_payout

pytestmark = pytest.mark.django_db

PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def demo(django_db_setup: None, django_db_blocker) -> Iterator[None]:  # type: ignore[no-untyped-def]
    with django_db_blocker.unblock():
        call_command("flush", interactive=False)
        call_command("seed_demo", stdout=io.StringIO())
    yield
    with django_db_blocker.unblock():
        call_command("flush", interactive=False)


def client_for(role: str | None) -> Client:
    """A logged-in client: role is a group name, "superuser", or None (no group at all)."""
    user = User.objects.create_user(f"user-{role}", password=PASSWORD,
                                    is_superuser=role == "superuser",
                                    is_staff=role == "superuser")
    if role not in (None, "superuser"):
        user.groups.add(Group.objects.get(name=role))
    client = Client()
    client.force_login(user)
    return client


def pages() -> list[str]:
    payout = Payout.objects.filter(status="failed").first()
    event = WebhookEvent.objects.filter(status="failed").first()
    assert payout and event
    return [reverse("payout-list"), reverse("payout-detail", args=[payout.pk]),
            reverse("event-list"), reverse("event-detail", args=[event.pk]),
            reverse("transaction-logs"), reverse("health"), reverse("seller-payouts")]


@pytest.mark.parametrize("role", ["Support", "Managers", "superuser"])
def test_every_page_renders_for_each_role(demo, role):
    client = client_for(role)
    for url in pages():
        response = client.get(url)
        assert response.status_code == 200, url


def test_anonymous_users_are_sent_to_login(demo):
    for url in pages():
        response = Client().get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url


def test_a_user_without_a_role_sees_nothing(demo):
    client = client_for(None)
    for url in pages():
        assert client.get(url).status_code == 403, url


def test_the_replay_button_shows_for_support_only(demo):
    url = reverse("event-list") + "?status=failed"
    support_page = client_for("Support").get(url).content
    assert b"Replay selected" in support_page and b">Replay</button>" in support_page
    manager_page = client_for("Managers").get(url).content
    assert b"Replay selected" not in manager_page and b">Replay</button>" not in manager_page


def test_payout_filters_and_search(demo):
    client = client_for("Support")
    failed = client.get(reverse("payout-list"), {"status": "failed"})
    assert failed.context["table"].paginator.count == Payout.objects.filter(status="failed").count()
    by_account = client.get(reverse("payout-list"), {"q": "acct_1DemoAtelier"})
    assert {row.record.seller.name for row in by_account.context["table"].paginated_rows} == {
        "Atelier Nord"}
    by_name = client.get(reverse("payout-list"), {"q": "heron"})
    assert by_name.context["table"].paginator.count == 8
    by_code = client.get(reverse("payout-list"), {"failure_code": "account_closed"})
    assert all(row.record.failure_code == "account_closed"
               for row in by_code.context["table"].paginated_rows)


def test_htmx_requests_get_only_the_results_fragment(demo):
    client = client_for("Support")
    full = client.get(reverse("payout-list"), {"status": "paid"}).content.decode()
    fragment = client.get(reverse("payout-list"), {"status": "paid"},
                          HTTP_HX_REQUEST="true").content.decode()
    assert "<html" in full and "<html" not in fragment
    assert fragment.strip().startswith('<section id="results"')


def test_event_filters(demo):
    client = client_for("Managers")
    dead = client.get(reverse("event-list"), {"status": "dead"})
    assert [row.record.stripe_event_id for row in dead.context["table"].paginated_rows] == [
        "evt_1DemoDeadFailed01"]
    by_type = client.get(reverse("event-list"), {"type": "payout.canceled"})
    assert by_type.context["table"].paginator.count == 6


def test_event_detail_shows_payload_headers_and_attempts(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    page = client_for("Managers").get(reverse("event-detail", args=[event.pk])).content.decode()
    assert "&quot;id&quot;: &quot;evt_1DemoReplayMe01&quot;" in page  # indented JSON
    assert "user-agent: Stripe/1.0" in page
    assert "terminating connection due to administrator command" in page


def test_payout_detail_shows_reset_transactions_and_timeline(demo):
    payout = Payout.objects.filter(status="failed").first()
    page = client_for("Support").get(reverse("payout-detail", args=[payout.pk])).content.decode()
    assert page.count('<span class="no">no</span>') == payout.payout_items.count()
    assert "payout.failed" in page and "paid → failed" in page


def test_transaction_log_filters_and_stats(demo):
    client = client_for("Managers")
    response = client.get(reverse("transaction-logs"),
                          {"window": "7d", "operation": "webhook.process_event",
                           "isolation_level": "serializable", "min_duration_ms": "0"})
    stats = {s.operation: s for s in response.context["stats"]}
    assert stats["webhook.process_event"].transactions > 100
    assert response.context["table"].paginator.count > 100
    slow = client.get(reverse("transaction-logs"), {"min_duration_ms": "100000"})
    assert slow.context["table"].paginator.count == 0


def test_health_figures(demo):
    response = client_for("Managers").get(reverse("health"))
    context = response.context
    assert context["backlog"].dead == 1
    assert context["stuck_count"] >= 1
    by_status = {row["status"]: row for row in context["by_status"]}
    assert set(by_status) == {"pending", "in_transit", "paid", "failed", "canceled", "reversed"}
    reversed_ = Payout.objects.get(reversed_at__isnull=False)
    assert (by_status["reversed"]["count"], by_status["reversed"]["amount"]) == (
        1, reversed_.amount)
    paid = Payout.objects.filter(status="paid", reversed_at=None, original_payout=None)
    assert by_status["paid"]["count"] == paid.count()
    assert by_status["paid"]["amount"] == sum(p.amount for p in paid)
    assert {row["failure_code"] for row in context["failure_codes"]} >= {"account_closed"}
    assert b"<svg" in response.content




def test_health_ledger_totals_are_computed_once_a_minute(demo):
    """The whole-ledger totals come from a one-minute summary, shown with its time."""
    client = client_for("Managers")
    def paid(context: dict) -> int:
        return sum(row["count"] for row in context["by_status"] if row["status"] == "paid")

    first = client.get(reverse("health")).context
    make_payout(status="paid")

    again = client.get(reverse("health")).context
    assert again["summary_at"] == first["summary_at"]
    assert again["by_status"] == first["by_status"]

    cache.clear()  # as if the minute had passed
    fresh = client.get(reverse("health")).context
    assert fresh["summary_at"] > first["summary_at"]
    assert paid(fresh) == paid(first) + 1
    assert b"as of" in client.get(reverse("health")).content


def test_seller_payouts_show_eligible_balances(demo):
    page = client_for("Managers").get(reverse("seller-payouts"))
    balances = {b.seller.name: b for b in page.context["balances"]}
    assert len(balances) == 6  # every demo seller has released, unpaid transactions
    assert b"Resume" not in page.content


def test_bad_filter_values_are_named_and_ignored(demo):
    client = client_for("Support")
    response = client.get(reverse("payout-list"), {"status": "bogus", "created_after": "x",
                                                    "page": "999", "sort": "nope"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "Select a valid choice" in page and "Enter a valid date" in page
    assert response.context["table"].paginator.count == Payout.objects.count()
    for url in ["/events/?status=zzz&received_after=x",
                "/transactions/?min_duration_ms=abc&window=zz"]:
        assert client.get(url).status_code == 200
    assert client.get(reverse("payout-detail", args=[10**9])).status_code == 404


# --- the ledger's rules, as staff see them ---------------------------------------------


def test_held_events_are_a_filter_and_a_number(demo):
    client = client_for("Support")
    held = client.get(reverse("event-list"), {"status": "held"})
    ids = {row.record.stripe_event_id for row in held.context["table"].paginated_rows}
    assert ids == {"evt_1DemoHeldAccount01", "evt_1DemoHeldAmount01"}
    assert "2 held for a decision" in held.content.decode()
    health = client_for("Managers").get(reverse("health"))
    assert health.context["backlog"].held == 2
    assert '<a href="/events/?status=held">2 held</a>' in health.content.decode()


def test_a_held_event_shows_why_and_how_to_dismiss_it(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoHeldAccount01")
    page = client_for("Support").get(reverse("event-detail", args=[event.pk])).content.decode()
    assert "Held: this event disagrees with our ledger" in page
    assert ("account is acct_1DemoBlueHeron0000 in the event, acct_1DemoAtelierNord00 on our "
            "payout") in page
    assert reverse("event-dismiss", args=[event.pk]) in page
    manager = client_for("Managers").get(reverse("event-detail", args=[event.pk]))
    assert reverse("event-dismiss", args=[event.pk]) not in manager.content.decode()


def test_a_waiting_event_says_when_it_gives_up(demo, settings):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoUnknownPaid01")
    assert event.status == "failed"
    client = client_for("Support")
    page = client.get(reverse("event-detail", args=[event.pk])).content.decode()
    gives_up = event.received_at + timedelta(hours=settings.WEBHOOK_RETRY_HORIZON_HOURS)
    assert f"not before {gives_up:%Y-%m-%d %H:%M} UTC" in page
    processed = WebhookEvent.objects.filter(status="processed").first()
    assert processed is not None
    assert "Gives up" not in client.get(
        reverse("event-detail", args=[processed.pk])).content.decode()


def test_payouts_to_review_and_reversed_payouts_are_filters(demo):
    client = client_for("Support")
    review = client.get(reverse("payout-list"), {"flag": "review"})
    # seed_demo's same-second tie, and its payout missing at Stripe (reconcile_payouts).
    marked = [Payout.objects.get(review_reason__contains=reason).stripe_payout_id
              for reason in ("same second", "Stripe does not know")]
    assert sorted(row.record.stripe_payout_id
                  for row in review.context["table"].paginated_rows) == sorted(marked)
    reversed_ = client.get(reverse("payout-list"), {"flag": "reversed"})
    [row] = reversed_.context["table"].paginated_rows
    assert row.record.is_reversed
    assert "badge-reversed" in reversed_.content.decode()
    health = client_for("Managers").get(reverse("health")).content.decode()
    assert "2 payouts to review" in health
