"""Replays from the console and the admin: permissions, CSRF, HTMX row swap, bulk."""

import io

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from payouts.models import BulkReplay, WebhookEvent, WebhookEventAttempt
from payouts.roles import ensure_roles
from payouts.services import bulk_replay

pytestmark = pytest.mark.django_db(transaction=True)  # replay runs its own SERIALIZABLE txn

PASSWORD = "a long enough password"


@pytest.fixture
def demo(transactional_db: None) -> None:
    call_command("seed_demo", stdout=io.StringIO())


def client_for(role: str, *, enforce_csrf_checks: bool = False) -> Client:
    ensure_roles(Group, Permission)
    user = User.objects.create_user(f"user-{role}", password=PASSWORD,
                                    is_superuser=role == "superuser",
                                    is_staff=role == "superuser")
    if role != "superuser":
        user.groups.add(Group.objects.get(name=role))
    client = Client(enforce_csrf_checks=enforce_csrf_checks)
    client.force_login(user)
    return client


def test_a_managers_replay_post_is_forbidden_and_changes_nothing(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    client = client_for("Managers")
    response = client.post(reverse("event-replay", args=[event.pk]), HTTP_HX_REQUEST="true")
    assert response.status_code == 403
    bulk = client.post(reverse("event-bulk-replay"), {"all_failed": "1"})
    assert bulk.status_code == 403
    event.refresh_from_db()
    assert event.status == "failed"
    assert not WebhookEventAttempt.objects.filter(event=event, trigger="replay").exists()


def test_replay_by_htmx_returns_the_swapped_row(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    response = client_for("Support").post(reverse("event-replay", args=[event.pk]),
                                          HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.strip().startswith(f'<tr id="event-{event.pk}"')
    assert 'badge-processed' in html and 'data-replayed="applied"' in html
    attempt = WebhookEventAttempt.objects.get(event=event, trigger="replay")
    assert attempt.requested_by.username == "user-Support"
    assert attempt.outcome == "applied"


def test_replay_without_javascript_redirects_with_a_message(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    client = client_for("Support")
    response = client.post(reverse("event-replay", args=[event.pk]), follow=True)
    assert response.status_code == 200
    assert b"evt_1DemoReplayMe01 replayed: applied, now processed" in response.content
    assert b'class="msg-success"' in response.content


def test_replay_needs_post_and_csrf(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    user = User.objects.create_user("csrf-user", password=PASSWORD)
    user.groups.add(Group.objects.get(name="Support"))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    url = reverse("event-replay", args=[event.pk])
    assert client.get(url).status_code == 405
    assert client.post(url, HTTP_HX_REQUEST="true").status_code == 403  # no token
    event.refresh_from_db()
    assert event.status == "failed"


def test_bulk_replay_of_all_failed_events(demo):
    """Replay all failed: a job of exactly the failed events, run by a worker."""
    failed_before = WebhookEvent.objects.filter(status="failed").count()
    assert failed_before >= 2
    response = client_for("Support").post(reverse("event-bulk-replay"), {"scope": "failed"},
                                          follow=True)
    job = BulkReplay.objects.get()
    assert response.redirect_chain == [(reverse("bulk-replay-detail", args=[job.pk]), 303)]
    assert f"Bulk replay of {failed_before} events queued".encode() in response.content
    assert (job.total, job.description, job.filter_params) == (
        failed_before, "status failed", {"status": ["failed"]})
    bulk_replay.run_next("test-worker")
    assert WebhookEventAttempt.objects.filter(trigger="replay").count() == failed_before


def test_bulk_replay_of_selected_events(demo):
    chosen = list(WebhookEvent.objects.filter(status="processed")
                  .values_list("pk", flat=True)[:3])
    response = client_for("Support").post(reverse("event-bulk-replay"), {
        "scope": "selected", "event_ids": [str(pk) for pk in chosen]})
    assert response.status_code == 303
    job = bulk_replay.run_next("test-worker")
    # Applied already: skipped.
    assert (job.description, job.done, job.skipped) == ("3 selected events", 3, 3)


def test_admin_replay_action_respects_the_permission(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    admin = client_for("superuser")
    response = admin.post("/admin/payouts/webhookevent/",
                          {"action": "replay_selected", "_selected_action": [event.pk]},
                          follow=True)
    assert b"Replayed: 1 applied" in response.content
    event.refresh_from_db()
    assert event.status == "processed"


def test_only_superusers_may_resume_a_payout(demo):
    from payouts.models import Payout

    payout = Payout.objects.filter(status="pending").first()
    Payout.objects.filter(pk=payout.pk).update(reference="pcp_test", creation_state="reserved")
    url = reverse("payout-resume", args=[payout.pk])
    assert client_for("Support").post(url).status_code == 403
    superuser = client_for("superuser")
    page = superuser.get(reverse("seller-payouts")).content.decode()
    assert "pcp_test" in page and ">Resume</button>" in page
    # No STRIPE_API_KEY in tests: resuming says so and leaves the payout reserved.
    response = superuser.post(url, follow=True)
    assert b"STRIPE_API_KEY" in response.content
    assert Payout.objects.get(pk=payout.pk).creation_state == "reserved"


def test_bulk_replay_refuses_ids_that_are_not_events(demo):
    support = client_for("Support")
    url = reverse("event-bulk-replay")
    not_ids = support.post(url, {"scope": "selected", "event_ids": ["abc", "-1"]})
    assert not_ids.status_code == 400
    assert "event_ids must be event numbers" in not_ids.content.decode()
    unknown = support.post(url, {"scope": "selected", "event_ids": ["99999999"]})
    assert unknown.status_code == 400
    assert "no event matches: nothing to replay" in unknown.content.decode()
    assert not BulkReplay.objects.exists()


def test_support_dismisses_a_held_event_with_a_reason(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoHeldAmount01")
    url = reverse("event-dismiss", args=[event.pk])
    assert client_for("Managers").post(url, {"reason": "no"}).status_code == 403
    support = client_for("Support")

    empty = support.post(url, {"reason": "  "}, follow=True)
    assert "Say why the event is dismissed." in empty.content.decode()
    event.refresh_from_db()
    assert event.status == "held"

    done = support.post(url, {"reason": "Confirmed with Stripe: not ours"}, follow=True)
    assert done.redirect_chain == [(reverse("event-detail", args=[event.pk]), 303)]
    assert "dismissed: it stays on record as skipped" in done.content.decode()
    event.refresh_from_db()
    assert event.status == "skipped"
    assert event.status_reason == "dismissed by user-Support: Confirmed with Stripe: not ours"
    attempt = event.attempts_log.get(trigger="dismiss")
    assert attempt.requested_by.username == "user-Support"
    again = support.post(url, {"reason": "twice"}, follow=True)
    assert "is skipped, not held" in again.content.decode()
