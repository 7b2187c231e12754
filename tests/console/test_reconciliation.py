"""The Reconciliation page, Resync from Stripe on a payout, the health page's Stripe sync
panel, and where an event came from (its source, and how long Stripe keeps it)."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from payouts import stripe_events
from payouts.models import JobRun, PaymentTransaction, Payout, WebhookEvent
from payouts.roles import ensure_roles
from tests.factories import make_payout, make_seller
from tests.fakestripe import FakeStripe

pytestmark = pytest.mark.django_db
# A resync runs the processor in its own SERIALIZABLE transactions.
resyncs = pytest.mark.django_db(transaction=True)

PASSWORD = "a long enough password"
Job, Trigger, Status = JobRun.Job, JobRun.Trigger, JobRun.Status


def user_for(role: str) -> User:
    ensure_roles(Group, Permission)
    user = (User.objects.filter(username=f"user-{role}").first()
            or User.objects.create_user(f"user-{role}", password=PASSWORD))
    user.groups.add(Group.objects.get(name=role))
    return user


def client_for(role: str, *, enforce_csrf_checks: bool = False) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf_checks)
    client.force_login(user_for(role))
    return client


def job_run(job: str, status: str, *, ago_minutes: float = 5, **fields: object) -> JobRun:
    started = timezone.now() - timedelta(minutes=ago_minutes)
    finished = None if status == Status.RUNNING else started + timedelta(seconds=2.5)
    values: dict[str, object] = {"trigger": Trigger.SCHEDULE, "runner": "host:1:abc",
                                 "apply": True, **fields}
    return JobRun.objects.create(job=job, status=status, started_at=started,
                                 finished_at=finished, **values)


def stored_event(stripe_event_id: str, *, created: datetime, status: str = "processed",
                 **fields: object) -> WebhookEvent:
    return WebhookEvent.objects.create(
        stripe_event_id=stripe_event_id, type="payout.failed", stripe_created=created,
        stripe_object_id=str(fields.pop("stripe_object_id", "po_x")), raw_body=b"{}",
        status=status, **fields)


def messages_of(response) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


# --- the Reconciliation page -----------------------------------------------------------------


@pytest.fixture
def findings() -> dict[str, Payout]:
    """A full reconcile run with --apply that found three payouts: one applied (its resync
    event stored), one held, one missing at Stripe; older runs of both jobs around it."""
    seller = make_seller("acct_recon00000001")
    applied = make_payout(seller, stripe_payout_id="po_drift_applied", status="paid")
    held = make_payout(seller, stripe_payout_id="po_drift_held")
    missing = make_payout(None, stripe_payout_id="po_gone_at_stripe")
    Payout.objects.filter(pk__in=[held.pk, missing.pk]).update(
        review_reason="reconcile: check it", review_requested_at=timezone.now())
    resync = stored_event("resync_abc123", created=timezone.now(), source="resync",
                          stripe_object_id="po_drift_applied")
    job_run(Job.RECONCILE_PAYOUTS, Status.OK, ago_minutes=120,
            counts={"checked": 10, "drifted": 0, "missing": 0, "applied": 0,
                    "not_applied": 0, "errors": 0})
    job_run(Job.SYNC_EVENTS, Status.OK, ago_minutes=30, scope="--days 3",
            counts={"accounts": 4, "listed": 12, "new": 2, "applied": 2, "held": 0,
                    "waiting": 0, "unchanged": 0, "refused": 0})
    job_run(Job.RECONCILE_PAYOUTS, Status.DRIFTED, ago_minutes=10,
            counts={"checked": 10, "drifted": 2, "missing": 1, "applied": 1,
                    "not_applied": 1, "errors": 0},
            findings=[
                {"payout_id": applied.pk, "stripe_payout_id": "po_drift_applied",
                 "account": "acct_recon00000001",
                 "fields": {"status": ["in_transit", "paid"],
                            "arrival_date": ["none", "2025-03-04 00:00 UTC"]},
                 "missing": False, "applied": "applied", "event": resync.stripe_event_id},
                {"payout_id": held.pk, "stripe_payout_id": "po_drift_held",
                 "account": "acct_recon00000001", "fields": {"amount": ["3000", "2900"]},
                 "missing": False, "applied": "held: amount differs", "event": "resync_held1"},
                {"payout_id": missing.pk, "stripe_payout_id": "po_gone_at_stripe",
                 "account": "", "fields": {}, "missing": True, "applied": "marked for review",
                 "event": ""},
            ])
    # A console resync of one payout: listed in the runs, not taken for the drift.
    job_run(Job.RECONCILE_PAYOUTS, Status.OK, ago_minutes=1, trigger=Trigger.CONSOLE,
            scope="po_drift_applied", requested_by=user_for("Support"),
            counts={"checked": 1, "drifted": 0})
    return {"applied": applied, "held": held, "missing": missing, "event": resync}


@pytest.mark.parametrize("role", ["Support", "Managers"])
def test_reconciliation_lists_runs_drift_and_missing_payouts(findings, role):
    response = client_for(role).get(reverse("reconciliation"))
    assert response.status_code == 200
    page = response.content.decode()
    assert f'href="{reverse("reconciliation")}" aria-current="page">Reconciliation</a>' in page

    runs = page[page.index('id="runs-table"'):]
    assert runs.count("<tr>") == 1 + 4  # header and the four runs, newest first
    assert runs.index("console by user-Support") < runs.index("sync_events")
    assert "scheduled" in runs and "Started (UTC)" in runs
    assert '<span class="badge run-drifted">drifted</span>' in runs
    assert '<span class="badge run-ok">ok</span>' in runs
    assert "10 checked · 2 drifted · 1 missing at Stripe · 1 applied · 1 not applied" in runs
    assert "4 accounts · 12 events listed · 2 new · 2 applied" in runs
    assert "2.5 s" in runs

    drift = page[page.index('id="drift-table"'):page.index('id="missing"')]
    assert "Run with <code>--apply</code>" in page
    assert drift.count("<tr>") == 1 + 2
    applied_url = reverse("payout-detail", args=[findings["applied"].pk])
    assert f'<a class="mono" href="{applied_url}">po_drift_applied</a>' in drift
    assert "in_transit → <strong>paid</strong>" in drift
    assert "none → <strong>2025-03-04 00:00 UTC</strong>" in drift
    assert '<span class="badge badge-applied">applied</span>' in drift
    event_url = reverse("event-detail", args=[findings["event"].pk])
    assert f'href="{event_url}">resync_abc123</a>' in drift
    assert '<span class="badge badge-held">held</span> <span class="muted">amount differs' in drift
    assert "resync_held1</span> <span class=\"muted\">(not stored)" in drift

    missing = page[page.index('id="missing-table"'):page.index('id="runs"')]
    missing_url = reverse("payout-detail", args=[findings["missing"].pk])
    assert f'href="{missing_url}">po_gone_at_stripe</a>' in missing
    assert "platform" in missing and "marked for review" in missing
    assert "po_drift" not in missing

    assert f'<a href="{reverse("payout-list")}?flag=review">2 payouts marked for review</a>' \
        in page


def test_reconciliation_without_any_run():
    page = client_for("Managers").get(reverse("reconciliation")).content.decode()
    assert "No reconcile run yet — <code>manage.py reconcile_payouts</code> or a worker with " \
           "<code>STRIPE_API_KEY</code> runs it." in page
    assert "No runs yet." in page
    assert "No payout is marked for review." in page


def test_reconciliation_without_drift_says_when_it_was_checked(settings):
    settings.STRIPE_API_KEY = "sk_test_fake"
    run = job_run(Job.RECONCILE_PAYOUTS, Status.OK, counts={"checked": 3})
    page = client_for("Support").get(reverse("reconciliation")).content.decode()
    assert f"No drift at {run.finished_at:%Y-%m-%d %H:%M} UTC." in page
    assert "None: Stripe knew every payout the run checked." in page
    assert "Scheduled sync is off" not in page


def test_a_failed_latest_run_is_said_and_the_last_complete_one_is_shown(findings):
    job_run(Job.RECONCILE_PAYOUTS, Status.FAILED, ago_minutes=2,
            error="Stripe refused STRIPE_API_KEY (HTTP 401, request req_1)")
    page = client_for("Support").get(reverse("reconciliation")).content.decode()
    assert 'id="latest-incomplete"' in page
    assert "Stripe refused STRIPE_API_KEY (HTTP 401" in page
    assert '<span class="badge run-failed">failed</span>' in page
    assert "po_drift_applied" in page[page.index('id="drift-table"'):]  # the run before


def test_a_drifted_run_with_errors_says_which_payouts_stripe_did_not_answer_for():
    job_run(Job.RECONCILE_PAYOUTS, Status.DRIFTED, counts={"checked": 4, "errors": 1},
            error="po_x: GET /v1/payouts/po_x failed after 5 attempt(s): HTTP 503")
    page = client_for("Managers").get(reverse("reconciliation")).content.decode()
    assert "Stripe did not answer for some payouts: po_x: GET /v1/payouts/po_x failed" in page
    assert "4 checked · 1 error" in page


def test_a_user_without_a_role_may_not_see_reconciliation():
    user = User.objects.create_user("nobody", password=PASSWORD)
    client = Client()
    client.force_login(user)
    assert client.get(reverse("reconciliation")).status_code == 403


# --- health: the Stripe sync panel -------------------------------------------------------------


def test_health_shows_the_last_run_of_each_job(findings, settings):
    settings.STRIPE_API_KEY = ""
    job_run(Job.SYNC_EVENTS, Status.FAILED, ago_minutes=0.5, error="Stripe unreachable")
    page = client_for("Managers").get(reverse("health")).content.decode()
    panel = page[page.index('id="panel-stripe-sync"'):page.index('id="panel-status"')]
    assert "Scheduled sync is off: <code>STRIPE_API_KEY</code> is not set." in panel
    assert f'<a href="{reverse("reconciliation")}">Reconciliation</a>' in panel
    sync = panel[panel.index('id="sync-sync_events"'):panel.index('id="sync-reconcile')]
    assert '<span class="badge run-failed">failed</span>' in sync
    assert "Stripe unreachable" in sync
    # The newest full run, not the newer Resync of one payout from the console.
    reconcile = panel[panel.index('id="sync-reconcile_payouts"'):]
    assert '<span class="badge run-drifted">drifted</span>' in reconcile
    assert "scheduled" in reconcile and "10 checked · 2 drifted" in reconcile
    assert "console by user-Support" not in reconcile


def test_health_with_a_key_and_no_runs_yet(settings):
    settings.STRIPE_API_KEY = "sk_test_fake"
    settings.SYNC_EVENTS_MINUTES = 15
    page = client_for("Managers").get(reverse("health")).content.decode()
    panel = page[page.index('id="panel-stripe-sync"'):page.index('id="panel-status"')]
    assert "Scheduled sync is off" not in panel
    assert "every 15 min" in panel
    assert panel.count("never run") == 2


# --- events: where they came from, how long Stripe keeps them ---------------------------------


def test_event_detail_says_how_long_stripe_keeps_a_delivered_event():
    created = timezone.now() - timedelta(days=2)
    event = stored_event("evt_recent", created=created)
    page = client_for("Managers").get(reverse("event-detail", args=[event.pk])).content.decode()
    until = created + timedelta(days=30)
    assert f"Stripe keeps this event until {until:%Y-%m-%d %H:%M} UTC (30 days after it was " \
           "created)." in page
    assert '<span class="tag source-delivery">webhook delivery</span>' in page

    old = stored_event("evt_old", created=timezone.now() - timedelta(days=31))
    page = client_for("Support").get(reverse("event-detail", args=[old.pk])).content.decode()
    assert "No longer kept by Stripe (since" in page
    assert "Stripe keeps this event until" not in page


def test_event_detail_of_a_resync_event_shows_who_asked_and_no_stripe_window():
    alice = user_for("Support")
    event = stored_event("resync_0123", created=timezone.now(), source="resync",
                         source_detail="Resync from Stripe by alice", requested_by=alice)
    page = client_for("Managers").get(reverse("event-detail", args=[event.pk])).content.decode()
    assert '<span class="tag source-resync">resync from Stripe</span>' in page
    assert "Resync from Stripe by alice" in page
    assert "user-Support" in page  # requested_by, not named in the detail
    assert "keeps this event" not in page and "kept by Stripe" not in page


def test_events_list_shows_how_long_stripe_keeps_a_dead_event():
    created = timezone.now() - timedelta(days=5)
    stored_event("evt_dead_recent", created=created, status="dead",
                 status_reason="retries exhausted")
    stored_event("evt_dead_old", created=timezone.now() - timedelta(days=40), status="dead")
    stored_event("evt_fine", created=created)
    page = client_for("Managers").get(reverse("event-list")).content.decode()
    until = created + timedelta(days=30)
    assert "retries exhausted<span class=\"kept\"" in page
    assert f"kept at Stripe until {until:%Y-%m-%d %H:%M} UTC</span>" in page
    assert "no longer kept at Stripe (since" in page
    assert page.count('class="kept') == 2  # dead events only


def test_payout_timeline_shows_each_events_source_and_the_resync_button_for_support():
    payout = make_payout(stripe_payout_id="po_timeline1")
    stored_event("evt_delivered1", created=timezone.now() - timedelta(minutes=5),
                 stripe_object_id="po_timeline1")
    stored_event("evt_listed1", created=timezone.now() - timedelta(minutes=4),
                 stripe_object_id="po_timeline1", source="events_api",
                 source_detail="sync_events (scheduled)")
    url = reverse("payout-detail", args=[payout.pk])
    page = client_for("Support").get(url).content.decode()
    timeline = page[page.index('id="timeline"'):]
    assert '<span class="tag source-delivery">webhook delivery</span>' in timeline
    assert '<span class="tag source-events_api">Events API</span>' in timeline
    assert "sync_events (scheduled)" in timeline
    assert f'action="{reverse("payout-resync", args=[payout.pk])}"' in page
    assert ">Resync from Stripe</button>" in page

    assert ">Resync from Stripe</button>" not in client_for("Managers").get(url).content.decode()
    no_id = make_payout()
    Payout.objects.filter(pk=no_id.pk).update(stripe_payout_id=None)
    page = Client()
    page.force_login(User.objects.get(username="user-Support"))
    assert ">Resync from Stripe</button>" not in page.get(
        reverse("payout-detail", args=[no_id.pk])).content.decode()


# --- Resync from Stripe -------------------------------------------------------------------------


@pytest.fixture
def fake(settings) -> Iterator[FakeStripe]:  # type: ignore[no-untyped-def]
    with FakeStripe() as server:
        settings.STRIPE_API_KEY = "sk_test_fake"
        settings.STRIPE_API_BASE = server.url
        yield server


def at_stripe(fake: FakeStripe, payout: Payout, status: str) -> dict:  # type: ignore[type-arg]
    """``payout`` at Stripe as it is here (in transit, same amount and arrival)."""
    assert payout.seller is not None and payout.stripe_payout_id
    arrival = int(timezone.now().timestamp()) + 86400
    Payout.objects.filter(pk=payout.pk).update(arrival_date=datetime.fromtimestamp(arrival, UTC))
    fake.add_payout(stripe_events.payout_object(payout.stripe_payout_id, status="in_transit",
                                                amount=payout.amount, currency="usd",
                                                arrival_date=arrival),
                    payout.seller.stripe_account_id)
    if status != "in_transit":
        return fake.set_status(payout.stripe_payout_id, status, failure_code="account_closed")
    return fake.payouts[payout.stripe_payout_id]


def transactions_of(payout: Payout) -> list[PaymentTransaction]:
    return list(PaymentTransaction.objects.filter(
        transfers__payout_items__payout=payout).order_by("id"))


@resyncs
def test_resync_brings_a_drifted_payout_to_stripes_state(fake):
    payout = make_payout(stripe_payout_id="po_resync_drift", status="in_transit")
    at_stripe(fake, payout, "failed")
    assert all(t.payed_out for t in transactions_of(payout))

    response = client_for("Support").post(reverse("payout-resync", args=[payout.pk]),
                                          follow=True)
    assert response.redirect_chain == [(reverse("payout-detail", args=[payout.pk]), 303)]
    [(level, text)] = messages_of(response)
    assert level == "warning"
    assert "po_resync_drift differed from Stripe" in text
    assert "status in_transit → failed" in text and "failure_code none → account_closed" in text
    assert "applied" in text and "not applied" not in text

    payout.refresh_from_db()
    assert payout.status == "failed" and payout.failure_code == "account_closed"
    assert not any(t.payed_out for t in transactions_of(payout))  # released: owed again
    event = WebhookEvent.objects.get(stripe_object_id="po_resync_drift")
    assert event.source == WebhookEvent.Source.RESYNC
    assert event.requested_by == User.objects.get(username="user-Support")
    assert event.source_detail == "Resync from Stripe by user-Support"
    assert event.status == WebhookEvent.Status.PROCESSED
    run = JobRun.objects.get()
    assert (run.trigger, run.status, run.scope) == ("console", "drifted", "po_resync_drift")

    # The payout page shows the resync event on its timeline, with who asked.
    page = response.content.decode()
    timeline = page[page.index('id="timeline"'):]
    assert '<span class="tag source-resync">resync from Stripe</span>' in timeline
    assert "Resync from Stripe by user-Support" in timeline


@resyncs
def test_resync_of_a_payout_that_matches_stripe_changes_nothing(fake):
    payout = make_payout(stripe_payout_id="po_resync_same", status="in_transit")
    at_stripe(fake, payout, "in_transit")
    response = client_for("Support").post(reverse("payout-resync", args=[payout.pk]),
                                          follow=True)
    assert messages_of(response) == [("success", "po_resync_same matches Stripe: nothing to "
                                                 "change.")]
    assert not WebhookEvent.objects.exists()
    payout.refresh_from_db()
    assert payout.status == "in_transit" and payout.review_reason == ""
    assert JobRun.objects.get().status == Status.OK


@resyncs
def test_resync_of_a_payout_stripe_does_not_know_keeps_it_for_review(fake):
    payout = make_payout(stripe_payout_id="po_not_at_stripe", status="in_transit")
    response = client_for("Support").post(reverse("payout-resync", args=[payout.pk]),
                                          follow=True)
    [(level, text)] = messages_of(response)
    assert level == "warning"
    assert text.startswith("po_not_at_stripe is missing at Stripe (404 on acct_")
    assert "kept as it is, and marked for review" in text
    payout.refresh_from_db()
    assert payout.status == "in_transit"
    assert "Stripe does not know po_not_at_stripe" in payout.review_reason
    assert all(t.payed_out for t in transactions_of(payout))
    assert not WebhookEvent.objects.exists()
    assert 'id="review"' in response.content.decode()


def test_resync_without_stripe_api_key_is_refused_and_writes_nothing(settings):
    settings.STRIPE_API_KEY = ""
    payout = make_payout(stripe_payout_id="po_no_key", status="in_transit")
    response = client_for("Support").post(reverse("payout-resync", args=[payout.pk]),
                                          follow=True)
    [(level, text)] = messages_of(response)
    assert level == "error"
    assert text.startswith("po_no_key: not resynced. STRIPE_API_KEY is not set")
    assert not JobRun.objects.exists()
    assert not WebhookEvent.objects.exists()
    payout.refresh_from_db()
    assert payout.status == "in_transit" and payout.review_reason == ""


def test_resync_is_a_post_by_support_with_a_csrf_token(settings):
    settings.STRIPE_API_KEY = ""  # nothing could run anyway
    payout = make_payout(stripe_payout_id="po_resync_perm")
    url = reverse("payout-resync", args=[payout.pk])
    assert client_for("Support").get(url).status_code == 405
    assert client_for("Managers").post(url).status_code == 403
    csrf_checked = Client(enforce_csrf_checks=True)
    csrf_checked.force_login(User.objects.get(username="user-Support"))
    assert csrf_checked.post(url).status_code == 403
    assert Client().post(url).status_code == 302  # anonymous: to the login page
    no_id = make_payout()
    Payout.objects.filter(pk=no_id.pk).update(stripe_payout_id=None)
    support = Client()
    support.force_login(User.objects.get(username="user-Support"))
    assert support.post(reverse("payout-resync", args=[no_id.pk])).status_code == 404
    assert not JobRun.objects.exists()


@resyncs
def test_resync_that_the_ledger_holds_marks_the_payout_for_review(fake):
    payout = make_payout(stripe_payout_id="po_resync_amount", status="in_transit")
    at_stripe(fake, payout, "in_transit")
    fake.payouts["po_resync_amount"]["amount"] = 2500  # Stripe says another amount
    response = client_for("Support").post(reverse("payout-resync", args=[payout.pk]),
                                          follow=True)
    [(level, text)] = messages_of(response)
    assert level == "warning"
    assert text.startswith("po_resync_amount differs from Stripe (ours → Stripe's: amount "
                           "3000 → 2500); not applied (held: ")
    assert text.endswith("marked for review.")
    payout.refresh_from_db()
    assert payout.amount == 3000 and payout.status == "in_transit"
    assert "not applied (held" in payout.review_reason
    event = WebhookEvent.objects.get(stripe_object_id="po_resync_amount")
    assert (event.source, event.status) == ("resync", "held")


@resyncs
def test_resync_with_a_key_stripe_refuses_says_so(fake, settings):
    settings.STRIPE_API_KEY = "not_a_key_stripe_knows"  # 401 from Stripe
    payout = make_payout(stripe_payout_id="po_resync_401", status="in_transit")
    response = client_for("Support").post(reverse("payout-resync", args=[payout.pk]),
                                          follow=True)
    [(level, text)] = messages_of(response)
    assert level == "error"
    assert text.startswith("po_resync_401: resync failed. Stripe refused STRIPE_API_KEY (HTTP 401")
    assert JobRun.objects.get().status == Status.FAILED
    assert not WebhookEvent.objects.exists()
    payout.refresh_from_db()
    assert payout.status == "in_transit" and payout.review_reason == ""
