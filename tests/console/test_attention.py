"""Where each role lands, and the Needs attention page with the navigation's badge."""

import io

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from payouts import selectors
from payouts.models import WebhookEvent
from payouts.roles import ensure_roles
from payouts.services import bulk_replay

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def demo(transactional_db: None) -> None:
    call_command("seed_demo", stdout=io.StringIO())


def person(name: str, role: str) -> User:
    ensure_roles(Group, Permission)
    user = User.objects.create_user(name, password="a long enough password")
    user.groups.add(Group.objects.get(name=role))
    return User.objects.get(pk=user.pk)


def client_of(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_support_lands_on_needs_attention_and_managers_on_health(demo):
    support = client_of(person("sam", "Support"))
    assert support.get("/").url == reverse("attention")
    manager = client_of(person("meg", "Managers"))
    assert manager.get("/").url == reverse("health")
    assert manager.get(reverse("attention")).status_code == 200  # they may look


def test_needs_attention_lists_what_waits_for_a_person_and_the_badge_counts_it(demo):
    counts = selectors.attention()
    assert counts.held and counts.dead and counts.failed and counts.to_review and counts.stuck
    page = client_of(person("sam", "Support")).get(reverse("attention")).content.decode()
    assert '<span id="attention-badge" class="count-badge"' in page  # shown, not hidden
    assert f'>{counts.total}<span class="visually-hidden"> waiting for a person' in page
    for event in WebhookEvent.objects.filter(status__in=["held", "dead", "failed"]):
        assert event.stripe_event_id in page
    held_at = page.index("evt_1DemoHeldAmount01")
    assert held_at < page.index("evt_1DemoDeadFailed01") < page.index("evt_1DemoReplayMe01")
    for payout in selectors.payouts_to_review():
        assert payout.stripe_payout_id in page
    for payout in selectors.payouts_stuck():
        assert payout.stripe_payout_id in page
    assert 'href="/payouts/?flag=stuck"' in page and 'href="/events/?status=dead"' in page


def test_a_bulk_replay_waiting_for_approval_shows_and_counts(demo, settings):
    settings.STRIPE_LIVEMODE = True
    settings.BULK_REPLAY_APPROVAL_THRESHOLD = 1
    asker = person("sam", "Support")
    before = selectors.attention().total
    ids = list(WebhookEvent.objects.filter(status="failed").values_list("pk", flat=True))
    job = bulk_replay.bulk_request(requested_by=asker, event_ids=ids, filter_params={},
                                   description="status failed")
    assert job.status == "awaiting_approval"
    assert selectors.attention().total == before + 1
    other = client_of(person("ola", "Support")).get(reverse("attention")).content.decode()
    assert 'id="pending-approvals"' in other
    assert reverse("bulk-replay-detail", args=[job.pk]) in other
    own = client_of(asker).get(reverse("attention")).content.decode()
    assert "yours: another Support person approves it" in own


def test_an_empty_ledger_says_nothing_needs_a_person(transactional_db):
    page = client_of(person("sam", "Support")).get(reverse("attention")).content.decode()
    assert 'id="all-clear"' in page
    assert '<span id="attention-badge" hidden' in page
