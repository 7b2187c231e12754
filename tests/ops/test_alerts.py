"""Alerts: each rule fires on its condition and not otherwise; an alert opens once, stays
open, resolves once, with real deliveries (an HTTP receiver and aiosmtpd on 127.0.0.1);
failed deliveries are retried later without holding processing up; two evaluators at
once open one alert."""

from __future__ import annotations

import itertools
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from payouts.models import Alert, JobRun, Payout, WebhookEvent
from payouts.services import alerts, inbox, jobs
from payouts.services.processing import event_receive
from tests.factories import make_payout, make_seller
from tests.ops.conftest import Mailbox, Receiver
from tests.payouts.helpers import payout_event, run_together

_serial = itertools.count(1)


def make_event(status: str = "processed", *, received_ago: timedelta = timedelta(0),
               **fields: Any) -> WebhookEvent:
    n = next(_serial)
    event = WebhookEvent.objects.create(
        stripe_event_id=f"evt_ops{n:08d}_{timezone.now().timestamp():.0f}", type="payout.paid",
        stripe_created=timezone.now(), raw_body=b"{}", status=status, **fields)
    if received_ago:
        WebhookEvent.objects.filter(pk=event.pk).update(received_at=timezone.now() - received_ago)
    return event


def stuck_payout(hours_past: float) -> Payout:
    payout = make_payout(status="in_transit", transactions=0)
    Payout.objects.filter(pk=payout.pk).update(
        arrival_date=timezone.now() - timedelta(hours=hours_past))
    return payout


def rules_found(now: Any = None) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in alerts.findings(now or timezone.now()):
        found.setdefault(f.rule, []).append(f.subject)
    return found


def check(now: Any = None) -> alerts.Evaluation:
    return alerts.check(alerts.Evaluation(), now)


# --- each rule --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_nothing_wrong_finds_nothing() -> None:
    make_event("processed")
    make_payout(status="in_transit", transactions=0)
    assert rules_found() == {}


@pytest.mark.django_db
def test_dead_events_over_the_threshold(settings: Any) -> None:
    settings.ALERT_DEAD_EVENTS = 1
    make_event("dead")
    assert "dead_events" not in rules_found()
    make_event("dead")
    assert rules_found()["dead_events"] == [""]


@pytest.mark.django_db
def test_held_events() -> None:
    make_event("skipped")
    assert "held_events" not in rules_found()
    make_event("held")
    assert rules_found()["held_events"] == [""]


@pytest.mark.django_db
def test_oldest_due_event(settings: Any) -> None:
    settings.HEALTH_OLDEST_DUE_SECONDS = 300
    make_event("received", next_attempt_at=timezone.now(), received_ago=timedelta(seconds=100))
    make_event("failed", next_attempt_at=timezone.now() + timedelta(hours=1),  # not due
               received_ago=timedelta(hours=2))
    assert "oldest_due" not in rules_found()
    make_event("failed", next_attempt_at=timezone.now(), received_ago=timedelta(seconds=400))
    assert rules_found()["oldest_due"] == [""]


@pytest.mark.django_db
def test_stuck_in_transit_after_the_grace_period(settings: Any) -> None:
    settings.ALERT_STUCK_GRACE_HOURS = 24
    stuck_payout(hours_past=23)
    assert "stuck_in_transit" not in rules_found()
    stuck_payout(hours_past=25)
    [finding] = [f for f in alerts.findings(timezone.now()) if f.rule == "stuck_in_transit"]
    assert finding.value == 1 and "1 payout in transit" in finding.summary


@pytest.mark.django_db
def test_failure_rate_by_code_and_by_seller(settings: Any) -> None:
    settings.ALERT_FAILURE_MIN_COUNT, settings.ALERT_FAILURE_RATE = 3, 0.25
    often, rarely = make_seller(), make_seller()
    for _ in range(2):
        make_payout(often, status="failed", transactions=0)
    Payout.objects.filter(status="failed").update(failure_code="account_closed")
    for _ in range(2):
        make_payout(rarely, status="paid", transactions=0)
    assert not {"failures_by_code", "failures_by_seller"} & set(rules_found())  # 2 < 3
    third = make_payout(often, status="failed", transactions=0)
    Payout.objects.filter(pk=third.pk).update(failure_code="account_closed")
    found = rules_found()  # 3 of 5 payouts: 60 %; the seller's 3 of 3
    assert found["failures_by_code"] == ["account_closed"]
    assert found["failures_by_seller"] == [often.stripe_account_id]
    settings.ALERT_FAILURE_RATE = 0.9  # 60 % is under it; the seller's 100 % is not
    found = rules_found()
    assert "failures_by_code" not in found and found["failures_by_seller"]
    settings.ALERT_FAILURE_WINDOW_HOURS = 1  # created long ago: outside the window
    Payout.objects.update(created_at=timezone.now() - timedelta(hours=2))
    assert "failures_by_seller" not in rules_found()


@pytest.mark.django_db
def test_a_burst_of_rejections_of_one_reason(settings: Any) -> None:
    settings.ALERT_REJECTIONS, settings.ALERT_REJECTION_WINDOW_MINUTES = 20, 5
    now = timezone.now()
    inbox.rejections_add({"bad_signature": (19, now), "invalid_json": (5, now)})
    assert "rejection_burst" not in rules_found()
    for _ in range(1):  # one more, counted as refusals are: through the counter
        inbox.rejection_count("bad_signature")
    [finding] = [f for f in alerts.findings(timezone.now()) if f.rule == "rejection_burst"]
    assert finding.subject == "bad_signature" and finding.value == 20
    assert "STRIPE_WEBHOOK_SECRET" in finding.summary
    # The same refusals, ten minutes on: outside the window.
    assert "rejection_burst" not in rules_found(now + timedelta(minutes=10))


@pytest.mark.django_db
def test_reconciliation_drift_is_the_last_full_runs() -> None:
    started = timezone.now() - timedelta(hours=2)
    JobRun.objects.create(job="reconcile_payouts", trigger="schedule", started_at=started,
                          finished_at=started, status="drifted",
                          counts={"drifted": 2, "missing": 1})
    assert rules_found()["reconcile_drift"] == [""]
    # A resync of one payout says nothing of the others.
    JobRun.objects.create(job="reconcile_payouts", trigger="console", scope="po_x",
                          started_at=timezone.now(), status="ok")
    assert "reconcile_drift" in rules_found()
    JobRun.objects.create(job="reconcile_payouts", trigger="schedule",
                          started_at=timezone.now(), status="ok")
    assert "reconcile_drift" not in rules_found()


@pytest.mark.django_db
def test_payouts_to_review() -> None:
    payout = make_payout(status="paid", transactions=0)
    assert "to_review" not in rules_found()
    Payout.objects.filter(pk=payout.pk).update(review_reason="drifted",
                                               review_requested_at=timezone.now())
    assert rules_found()["to_review"] == [""]


@pytest.mark.django_db
def test_events_of_another_api_version(settings: Any) -> None:
    settings.STRIPE_API_VERSION = "2025-09-30.clover"
    make_event(api_version="2025-09-30.clover")
    make_event(api_version="")  # our resync events have none
    make_event(api_version="2019-01-01", received_ago=timedelta(days=2))  # not recent
    assert "api_version" not in rules_found()
    make_event(api_version="2026-01-28.clover")
    assert rules_found()["api_version"] == ["2026-01-28.clover"]


@pytest.mark.django_db
def test_a_scheduled_job_not_finished_for_three_intervals(settings: Any) -> None:
    settings.STRIPE_API_KEY = "sk_test_ops"
    settings.SYNC_EVENTS_MINUTES, settings.RECONCILE_MINUTES = 15, 60
    now = timezone.now()
    JobRun.objects.create(job="sync_events", trigger="schedule", status="ok",
                          started_at=now - timedelta(minutes=40),
                          finished_at=now - timedelta(minutes=40))
    assert "job_overdue" not in rules_found()  # 40 min: under 3 x 15
    JobRun.objects.create(job="sync_events", trigger="schedule", status="failed",
                          started_at=now - timedelta(minutes=5), finished_at=now)
    assert "job_overdue" not in rules_found(now + timedelta(minutes=4))
    assert rules_found(now + timedelta(minutes=6))["job_overdue"] == ["sync_events"]
    settings.STRIPE_API_KEY = ""  # not scheduled: never late
    assert "job_overdue" not in rules_found(now + timedelta(minutes=6))


# --- open once, stay open, resolve once; delivered once each ------------------------------------


@pytest.mark.django_db
def test_an_alert_opens_once_stays_open_and_resolves_once(
        delivering: None, receiver: Receiver, mailbox: Mailbox) -> None:
    dead = make_event("dead")
    payout = stuck_payout(hours_past=48)
    result = check()
    assert sorted(result.opened) == ["dead_events", "stuck_in_transit"]
    assert len(receiver.bodies) == 2 and len(mailbox.messages) == 2
    assert any("ALERT dead_events: 1 dead event" in t for t in receiver.texts)
    assert all(m["X-Rcpt"] == "oncall@example.com,lead@example.com" for m in mailbox.messages)
    for _ in range(2):  # still holding: nothing new, nothing sent
        again = check()
        assert again.opened == [] and again.resolved == [] and len(again.open) == 2
    make_event("dead")  # worse: the same alert, its summary brought up to date
    check()
    assert Alert.objects.get(rule="dead_events").summary == "2 dead events"
    assert len(receiver.bodies) == 2 and len(mailbox.messages) == 2

    WebhookEvent.objects.filter(status="dead").update(status="skipped")
    Payout.objects.filter(pk=payout.pk).update(arrival_date=timezone.now() + timedelta(days=1))
    resolved = check()
    assert sorted(resolved.resolved) == ["dead_events", "stuck_in_transit"] and not resolved.open
    assert len(receiver.bodies) == 4 and len(mailbox.messages) == 4
    assert sum("RESOLVED" in t for t in receiver.texts) == 2
    assert sum("RESOLVED" in s for s in mailbox.subjects) == 2
    check()
    assert len(receiver.bodies) == 4 and len(mailbox.messages) == 4
    assert Alert.objects.filter(resolved_at__isnull=False, notified_open_at__isnull=False,
                                notified_resolved_at__isnull=False).count() == 2
    # The condition again: a new alert, told again.
    WebhookEvent.objects.filter(pk=dead.pk).update(status="dead")
    assert check().opened == ["dead_events"]
    assert Alert.objects.filter(rule="dead_events").count() == 2
    assert len(receiver.bodies) == 5


@pytest.mark.django_db
def test_a_failing_receiver_is_retried_later_and_the_email_not_sent_twice(
        delivering: None, receiver: Receiver, mailbox: Mailbox) -> None:
    make_event("held")
    receiver.failing = True
    first = check()
    alert = Alert.objects.get()
    assert first.delivery_errors and "HTTP Error 500" in alert.last_error
    assert alert.notified_open_at is None and alert.delivered_to == ["email"]
    assert alert.delivery_attempts == 1 and len(mailbox.messages) == 1
    assert check().delivery_errors == []  # not due again yet: nothing tried
    assert alert.next_delivery_at is not None
    later = alert.next_delivery_at + timedelta(seconds=1)
    assert check(later).delivery_errors  # still failing: tried again, backed off further
    alert.refresh_from_db()
    assert alert.delivery_attempts == 2
    assert alert.next_delivery_at - later >= timedelta(minutes=2) - timedelta(seconds=2)
    receiver.failing = False
    check(alert.next_delivery_at + timedelta(seconds=1))
    alert.refresh_from_db()
    assert alert.notified_open_at is not None and alert.last_error == ""
    assert len(receiver.bodies) == 1 and len(mailbox.messages) == 1  # e-mail sent once


@pytest.mark.django_db(transaction=True)
def test_a_hanging_receiver_does_not_hold_processing_up(
        delivering: None, receiver: Receiver, settings: Any) -> None:
    """The check waits on the receiver (up to its timeout) holding no lock: a delivery
    meanwhile is applied at once."""
    settings.ALERT_TIMEOUT_SECONDS = 3
    receiver.hang_s = 6
    payout = make_payout(status="in_transit")
    make_event("dead")
    done = threading.Event()

    def in_thread() -> None:
        try:
            check()
            done.set()
        finally:
            connection.close()  # this thread's own

    checking = threading.Thread(target=in_thread)
    checking.start()
    try:
        threading.Event().wait(0.5)  # the check is waiting on the receiver now
        assert not done.is_set()
        event = payout_event("payout.paid", payout.stripe_payout_id,
                             created=int(timezone.now().timestamp()))
        received = event_receive(event, b"{}", {})
        assert received.outcome is not None and received.outcome.kind == "applied"
        assert not done.is_set()
    finally:
        checking.join(30)
    assert done.is_set()
    alert = Alert.objects.get()
    assert "timed out" in alert.last_error and alert.notified_open_at is None


# --- two evaluators --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_evaluators_at_once_open_one_alert_and_send_it_once(
        delivering: None, receiver: Receiver, mailbox: Mailbox) -> None:
    make_event("held")
    for round_ in range(3):
        results = run_together(check, check)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert sum(len(r.opened) for r in results) == 1, round_
        assert Alert.objects.filter(resolved_at__isnull=True).count() == 1
        assert len(receiver.bodies) == 2 * round_ + 1 and len(mailbox.messages) == 2 * round_ + 1
        WebhookEvent.objects.filter(status="held").update(status="skipped")
        results = run_together(check, check)
        assert sum(len(r.resolved) for r in results) == 1
        assert len(receiver.bodies) == 2 * round_ + 2
        WebhookEvent.objects.filter(status="skipped").update(status="held")
    assert Alert.objects.count() == 3


# --- the command and the schedule -----------------------------------------------------------


@pytest.mark.django_db
def test_check_alerts_exit_codes_and_lines(capsys: Any, monkeypatch: Any) -> None:
    call_command("check_alerts")  # none open: exit 0
    assert "0 open" in capsys.readouterr().out
    make_event("held")
    with pytest.raises(CommandError) as some:
        call_command("check_alerts")
    out = capsys.readouterr().out
    assert some.value.returncode == 1 and "held_events: 1 held event (open since" in out

    def broken(now: Any) -> list[alerts.Finding]:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(alerts, "findings", broken)
    with pytest.raises(CommandError) as error:
        call_command("check_alerts")
    assert error.value.returncode == 2 and "the database went away" in str(error.value)


@pytest.mark.django_db
def test_the_alert_job_is_scheduled_without_a_stripe_key(settings: Any) -> None:
    settings.STRIPE_API_KEY = ""
    # without a key: the alerts, and retention (which asks Stripe nothing either)
    assert set(jobs.intervals()) == {jobs.CHECK_ALERTS, JobRun.Job.PRUNE}
    make_event("held")
    job = jobs.next_due("w1", stopping=lambda: False)
    assert job is not None and job.name == jobs.CHECK_ALERTS
    assert job.run() is None
    assert Alert.objects.filter(rule="held_events", resolved_at__isnull=True).exists()
    after = jobs.next_due("w2", stopping=lambda: False)  # the alerts are due in a minute
    assert after is None or after.name != jobs.CHECK_ALERTS


# --- shown on Health and on Needs attention ------------------------------------------------------


@pytest.mark.django_db
def test_open_alerts_are_shown_on_health_and_needs_attention(admin_client: Any) -> None:
    health = admin_client.get("/health/").content.decode()
    assert 'id="open-alerts"' in health and "None open." in health
    assert 'id="open-alerts"' not in admin_client.get("/attention/").content.decode()
    make_event("held")
    check()
    for page in ("/health/", "/attention/"):
        html = admin_client.get(page).content.decode()
        assert 'id="alert-held_events"' in html and "1 held event" in html, page
