"""The console's replay previews and bulk replays: pages, answers to bad input, permissions."""

import io

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from payouts.models import AuditEntry, BulkReplay, TransactionLog, WebhookEvent, WebhookEventAttempt
from payouts.roles import ensure_roles
from payouts.services import bulk_replay

pytestmark = pytest.mark.django_db(transaction=True)  # previews and replays: own transactions

PASSWORD = "a long enough password"


@pytest.fixture
def demo(transactional_db: None) -> None:
    call_command("seed_demo", stdout=io.StringIO())


def client_for(username: str, role: str) -> Client:
    ensure_roles(Group, Permission)
    user = User.objects.create_user(username, password=PASSWORD)
    user.groups.add(Group.objects.get(name=role))
    client = Client()
    client.force_login(user)
    return client


def nothing_written() -> tuple[int, ...]:
    return (BulkReplay.objects.count(), AuditEntry.objects.count(),
            WebhookEventAttempt.objects.count(), TransactionLog.objects.count())


def test_the_events_list_offers_replay_all_matching_with_its_count(demo):
    failed = WebhookEvent.objects.filter(status="failed").count()
    page = client_for("sup1", "Support").get(reverse("event-list"), {"status": "failed"})
    html = page.content.decode()
    assert f'data-confirm="Replay all {failed} matching events?"' in html
    assert f"Replay all matching ({failed})" in html
    assert 'name="query" value="status=failed"' in html
    assert "Preview selected" in html and ">Preview</button>" in html
    manager = client_for("mgr1", "Managers").get(reverse("event-list")).content.decode()
    assert "Replay all matching" not in manager and ">Preview</button>" not in manager


def test_replay_all_matching_freezes_the_filtered_events_into_a_job(demo):
    support = client_for("sup1", "Support")
    matching = list(WebhookEvent.objects.filter(type="payout.paid", status="processed")
                    .order_by("stripe_created", "pk").values_list("pk", flat=True))
    assert len(matching) > 10
    response = support.post(reverse("event-bulk-replay"), {
        "scope": "matching", "query": "type=payout.paid&status=processed&page=2&sort=-type"})
    job = BulkReplay.objects.get()
    assert response.status_code == 303
    assert response["Location"] == reverse("bulk-replay-detail", args=[job.pk])
    assert (job.event_ids, job.total, job.status) == (matching, len(matching), "queued")
    assert job.filter_params == {"type": ["payout.paid"], "status": ["processed"]}
    assert job.description == "status processed, type payout.paid"

    page = support.get(response["Location"]).content.decode()
    assert f"0 / {len(matching)}" in page and 'hx-trigger="every 1s"' in page
    assert "Cancel</button>" in page

    bulk_replay.run_next("test-worker")
    progress = support.get(response["Location"], HTTP_HX_REQUEST="true").content.decode()
    assert progress.lstrip().startswith('<section class="card bulk-progress" id="progress"')
    assert f"{len(matching)} / {len(matching)}" in progress
    assert "hx-trigger" not in progress  # done: the polling stops
    listed = support.get(reverse("bulk-replay-list")).content.decode()
    assert f"bulk replay {job.pk}" in listed and "status processed, type payout.paid" in listed


@pytest.mark.parametrize(("form", "status", "message"), [
    ({"scope": "matching", "query": "received_after=yesterday"}, 400, "The filter is not valid"),
    ({"scope": "matching", "query": "q=evt_nothing_like_it"}, 400, "no event matches"),
    ({"scope": "everything"}, 400, "scope must be selected, matching or failed"),
    ({"scope": "selected", "event_ids": ["1; DROP TABLE"]}, 400, "event_ids must be event numbers"),
    ({"scope": "selected", "event_ids": [str(n) for n in range(1, 502)]}, 400, "At most 500"),
])
def test_a_bad_bulk_replay_request_is_answered_and_writes_nothing(demo, form, status, message):
    before = nothing_written()
    response = client_for("sup1", "Support").post(reverse("event-bulk-replay"), form)
    assert response.status_code == status
    assert message in response.content.decode()
    assert nothing_written() == before


def test_a_preview_from_a_row_swaps_into_the_panel_and_writes_nothing(demo):
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    status_before, before = event.status, nothing_written()
    support = client_for("sup1", "Support")

    partial = support.post(reverse("event-preview"), {"event_ids": [event.pk]},
                           HTTP_HX_REQUEST="true")
    html = partial.content.decode()
    assert partial.status_code == 200
    assert html.lstrip().startswith('<section class="card preview" id="preview">')
    assert f'id="preview-{event.pk}" data-kind="applied"' in html
    page = support.post(reverse("event-preview"), {"event_ids": [event.pk]})
    assert "<h1>Replay preview</h1>" in page.content.decode()  # without JavaScript: a page

    event.refresh_from_db()
    assert event.status == status_before and nothing_written() == before
    assert support.post(reverse("event-preview")).status_code == 400  # nothing selected
    assert support.post(reverse("event-preview"),
                        {"event_ids": [str(n) for n in range(101)]}).status_code == 400
    assert support.post(reverse("event-preview"), {"event_ids": ["99999999"]}).status_code == 404


def test_four_eyes_in_the_console(demo, settings):
    settings.STRIPE_LIVEMODE = True
    settings.BULK_REPLAY_APPROVAL_THRESHOLD = 1  # the demo has 2 failed events
    requester, colleague = client_for("sup1", "Support"), client_for("sup2", "Support")
    manager = client_for("mgr1", "Managers")
    requester.post(reverse("event-bulk-replay"), {"scope": "failed"})
    job = BulkReplay.objects.get()
    assert job.status == "awaiting_approval"
    decide = reverse("bulk-replay-decide", args=[job.pk])

    own = requester.get(reverse("bulk-replay-detail", args=[job.pk])).content.decode()
    assert "another Support person must approve it" in own and 'name="decision"' not in own
    refused = requester.post(decide, {"decision": "approve", "reason": "mine anyway"})
    assert refused.status_code == 403 and "another Support person" in refused.content.decode()
    assert manager.post(decide, {"decision": "approve", "reason": "ok"}).status_code == 403
    assert colleague.post(decide, {"decision": "approve", "reason": " "}).status_code == 400
    assert colleague.post(decide, {"decision": "maybe", "reason": "x"}).status_code == 400
    job.refresh_from_db()
    assert job.status == "awaiting_approval"
    assert "Waiting for approval" in colleague.get(reverse("bulk-replay-list")).content.decode()

    theirs = colleague.get(reverse("bulk-replay-detail", args=[job.pk])).content.decode()
    assert 'name="decision" value="approve"' in theirs
    approved = colleague.post(decide, {"decision": "approve", "reason": "outage over"})
    assert approved.status_code == 303
    job.refresh_from_db()
    assert (job.status, job.decided_by.username) == ("queued", "sup2")
    assert colleague.post(decide, {"decision": "reject", "reason": "late"}).status_code == 409


def test_managers_get_403_on_every_post_and_nothing_is_written(demo):
    support = client_for("sup1", "Support")
    support.post(reverse("event-bulk-replay"), {"scope": "failed"})
    job = BulkReplay.objects.get()
    manager = client_for("mgr1", "Managers")
    before = nothing_written()
    event = WebhookEvent.objects.get(stripe_event_id="evt_1DemoReplayMe01")
    for url, form in [
        (reverse("event-preview"), {"event_ids": [event.pk]}),
        (reverse("event-bulk-replay"), {"scope": "failed"}),
        (reverse("bulk-replay-cancel", args=[job.pk]), {}),
        (reverse("bulk-replay-decide", args=[job.pk]), {"decision": "approve", "reason": "x"}),
    ]:
        assert manager.post(url, form).status_code == 403, url
    assert nothing_written() == before
    page = manager.get(reverse("bulk-replay-detail", args=[job.pk]))  # viewing is allowed
    assert page.status_code == 200 and "Cancel</button>" not in page.content.decode()


def test_cancel_from_the_console(demo):
    support = client_for("sup1", "Support")
    support.post(reverse("event-bulk-replay"), {"scope": "failed"})
    job = BulkReplay.objects.get()
    cancel = reverse("bulk-replay-cancel", args=[job.pk])
    assert support.post(cancel).status_code == 303
    job.refresh_from_db()
    assert job.status == "canceled"
    again = support.post(cancel)
    assert again.status_code == 409 and "already canceled" in again.content.decode()
    assert support.post(reverse("bulk-replay-cancel", args=[99999])).status_code == 404


@pytest.mark.parametrize(("value", "expected"), [("", "50"), ("0", "0"), ("200", "200")])
def test_the_approval_threshold_comes_from_the_environment(value, expected):
    from tests.console.test_settings import settings_in_subprocess

    result = settings_in_subprocess("print(settings.BULK_REPLAY_APPROVAL_THRESHOLD)",
                                    BULK_REPLAY_APPROVAL_THRESHOLD=value)
    assert result.stdout.strip() == expected, result.stderr


@pytest.mark.parametrize("value", ["-1", "fifty", "1.5"])
def test_an_approval_threshold_that_is_not_a_whole_number_is_refused(value):
    from tests.console.test_settings import settings_in_subprocess

    result = settings_in_subprocess("pass", BULK_REPLAY_APPROVAL_THRESHOLD=value)
    assert result.returncode != 0
    assert "BULK_REPLAY_APPROVAL_THRESHOLD must be a whole number" in result.stderr
