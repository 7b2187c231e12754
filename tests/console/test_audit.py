"""The audit page: what people did, from real replays and dismissals; filters, CSV, permission."""

from __future__ import annotations

import csv
import io
import time
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from payouts import stripe_events
from payouts.models import AuditEntry, Payout, WebhookEvent
from payouts.roles import ensure_roles
from payouts.services import inbox
from payouts.services.processing import event_process
from tests.factories import make_payout
from tests.payouts.helpers import payout_event

pytestmark = pytest.mark.django_db(transaction=True)  # replays run their own SERIALIZABLE txn

T0 = int(time.time()) - 3600


def client_for(role: str | None, username: str | None = None) -> Client:
    """Logged in as a new user of ``role`` (a group name, or None: no group)."""
    ensure_roles(Group, Permission)
    user = User.objects.create_user(username or f"user-{role}", password="x" * 12)
    if role:
        user.groups.add(Group.objects.get(name=role))
    client = Client()
    client.force_login(user)
    return client


def stored(event: dict[str, Any]) -> WebhookEvent:
    """An event stored as a delivery is, not processed yet."""
    recorded = inbox.event_record(event, stripe_events.encode(event), {}, lease_s=0)
    assert recorded.event_id is not None
    return WebhookEvent.objects.get(pk=recorded.event_id)


@pytest.fixture
def trail() -> dict[str, Any]:
    """Alice replays a payout.failed (in_transit → failed); Bob dismisses a held event."""
    failing = make_payout(status="in_transit")
    failed = stored(payout_event("payout.failed", failing.stripe_payout_id, created=T0))
    alice = client_for("Support", "alice")
    assert alice.post(reverse("event-replay", args=[failed.pk])).status_code == 302

    other = make_payout(status="in_transit")
    held = stored(payout_event("payout.paid", other.stripe_payout_id, created=T0, amount=1))
    event_process(event_id=held.pk, trigger="inline")
    held.refresh_from_db()
    assert held.status == WebhookEvent.Status.HELD
    bob = client_for("Support", "bob")
    bob.post(reverse("event-dismiss", args=[held.pk]), {"reason": "=not ours, said Stripe"})
    assert AuditEntry.objects.count() == 2
    return {"failed": failed, "failing": failing, "held": held, "other": other}


def rows(response: Any) -> list[AuditEntry]:
    return [row.record for row in response.context["table"].paginated_rows]


def test_the_audit_lists_a_replay_and_a_dismissal_with_the_payout_before_and_after(trail):
    response = client_for("Managers").get(reverse("audit"))
    assert response.status_code == 200
    assert [(e.actor_name, e.action) for e in rows(response)] == [
        ("bob", "dismiss"), ("alice", "replay")]
    page = response.content.decode()
    failed, failing = trail["failed"], Payout.objects.get(pk=trail["failing"].pk)
    event_url = reverse("event-detail", args=[failed.pk])
    payout_url = reverse("payout-detail", args=[failing.pk])
    assert f'<a href="{event_url}">{failed.stripe_event_id}</a>' in page
    assert f'href="{payout_url}">{failing.stripe_payout_id}</a>' in page
    assert f"in_transit → failed, failure code {failing.failure_code}" in page
    assert '<span class="badge badge-applied">applied</span>' in page
    assert '<span class="badge badge-skipped">skipped</span>' in page
    assert "=not ours, said Stripe" in page
    # the dismissal changed no payout: "—"; the time is relative with the exact UTC on hover
    dismissal = page[page.index("<td >bob</td>"):page.index("<td >alice</td>")]
    assert "<td >—</td>" in dismissal
    assert ' UTC</time> <span class="rel">just now</span>' in dismissal and 'title="' in dismissal
    assert '<a id="audit-export" href="?_export=csv"' in page


def test_filters_by_user_action_and_dates(trail):
    client = client_for("Support")
    assert [e.actor_name for e in rows(client.get(reverse("audit"), {"user": "alice"}))] == [
        "alice"]
    assert [e.action for e in rows(client.get(reverse("audit"), {"action": "dismiss"}))] == [
        "dismiss"]
    today = timezone.now().date()
    assert len(rows(client.get(reverse("audit"), {"after": today, "before": today}))) == 2
    assert rows(client.get(reverse("audit"), {"after": today + timedelta(days=1)})) == []
    fragment = client.get(reverse("audit"), {"action": "replay"}, HTTP_HX_REQUEST="true")
    assert fragment.content.decode().strip().startswith('<section id="results"')  # htmx swap
    choices = client.get(reverse("audit")).context["filter"].form.fields["user"].choices
    assert [name for name, _ in choices if name] == ["alice", "bob"]  # who appears, only


def test_csv_export_has_a_header_and_every_filtered_row(trail):
    client = client_for("Managers")
    response = client.get(reverse("audit"), {"_export": "csv"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    table = list(csv.reader(io.StringIO(response.content.decode())))
    assert table[0] == ["When", "Who", "Action", "Target", "Payout", "Outcome",
                        "Payout before → after", "Detail"]
    by_who = {row[1]: row for row in table[1:]}
    assert set(by_who) == {"alice", "bob"}
    failing = Payout.objects.get(pk=trail["failing"].pk)
    assert by_who["alice"][2:6] == ["replay", trail["failed"].stripe_event_id,
                                    failing.stripe_payout_id, "applied"]
    assert by_who["alice"][6] == f"in_transit → failed, failure code {failing.failure_code}"
    assert by_who["alice"][0].endswith("+00:00")  # the time zone is in the value
    assert by_who["bob"][6] == ""  # nothing changed
    assert by_who["bob"][7] == "'=not ours, said Stripe"  # never a spreadsheet formula

    only_replays = client.get(reverse("audit"), {"_export": "csv", "action": "replay"})
    table = list(csv.reader(io.StringIO(only_replays.content.decode())))
    assert [row[1] for row in table[1:]] == ["alice"]
    page = client.get(reverse("audit"), {"action": "replay"}).content.decode()
    assert 'href="?action=replay&amp;_export=csv"' in page  # the link keeps the filter


def test_the_audit_needs_its_permission(trail):
    assert client_for(None).get(reverse("audit")).status_code == 403
    assert client_for(None, "nobody-csv").get(
        reverse("audit"), {"_export": "csv"}).status_code == 403
    for role in ("Support", "Managers"):
        client = client_for(role)
        assert client.get(reverse("audit")).status_code == 200
        # the nav link shows to those who may open the page, and only to them
        assert '<a href="/audit/" >Audit</a>' in client.get(reverse("health")).content.decode()
    nobody = User.objects.create_user("dave", password="x" * 12)
    nobody.user_permissions.add(Permission.objects.get(codename="view_payout"))
    client = Client()
    client.force_login(nobody)
    assert ">Audit</a>" not in client.get(reverse("payout-list")).content.decode()
