"""Retention (payouts/services/retention.py): ``manage.py prune`` and the workers' daily job."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from structlog.testing import capture_logs

from payouts.models import (
    AuditEntry,
    BulkReplay,
    JobRun,
    ScheduledJob,
    TransactionLog,
    WebhookEvent,
    WebhookEventAttempt,
)
from payouts.services import jobs, retention
from payouts.worker import Worker
from tests.console.test_settings import settings_in_subprocess
from tests.payouts.test_stripe_truth import command

pytestmark = pytest.mark.django_db
DAY = timedelta(days=1)
Status = WebhookEvent.Status


def txlog(age: timedelta, event: WebhookEvent | None = None) -> TransactionLog:
    return TransactionLog.objects.create(
        operation="test", attempts=1, duration_ms=1.0, outcome="committed",
        started_at=timezone.now() - age, event=event)


def event(name: str, status: str, age: timedelta, *, attempts: int = 1) -> WebhookEvent:
    stored = WebhookEvent.objects.create(
        stripe_event_id=f"evt_{name}", type="payout.paid", stripe_created=timezone.now() - age,
        raw_body=b"{}", status=status)
    WebhookEvent.objects.filter(pk=stored.pk).update(received_at=timezone.now() - age)
    for _ in range(attempts):
        WebhookEventAttempt.objects.create(
            event=stored, trigger="worker", started_at=timezone.now() - age,
            finished_at=timezone.now() - age, outcome="applied", status_after=status)
    return stored


def test_old_transaction_logs_go_in_batches_and_newer_ones_stay() -> None:
    old = [txlog(31 * DAY + i * timedelta(minutes=1)) for i in range(12)]
    newer = [txlog(29 * DAY), txlog(timedelta(minutes=5))]
    with capture_logs() as logs:
        result = retention.prune(batch=5)
    assert result.deleted == {"transaction_logs": 12, "events": 0, "attempts": 0}
    assert [e["deleted"] for e in logs if e["event"] == "prune.batch"] == [5, 5, 2]
    assert result.batches == 3
    assert set(TransactionLog.objects.values_list("pk", flat=True)) == {t.pk for t in newer}
    assert not TransactionLog.objects.filter(pk__in=[t.pk for t in old]).exists()


def test_events_are_kept_forever_unless_retention_is_set(settings: Any) -> None:
    assert settings.RETENTION_EVENT_DAYS is None
    kept = event("ancient", Status.PROCESSED, 400 * DAY)
    assert retention.prune().deleted["events"] == 0
    assert WebhookEvent.objects.filter(pk=kept.pk).exists()


def test_only_old_settled_events_go_with_their_attempts(settings: Any) -> None:
    settings.RETENTION_EVENT_DAYS = 40
    old = 41 * DAY
    gone = [event(f"old_{s}", s, old, attempts=2)
            for s in (Status.PROCESSED, Status.SKIPPED, Status.IGNORED)]
    unsettled = [event(f"old_{s}", s, old)
                 for s in (Status.RECEIVED, Status.FAILED, Status.HELD, Status.DEAD)]
    recent = event("recent", Status.PROCESSED, 39 * DAY)
    # Needed by something: a person acted on it; an active bulk replay will replay it.
    audited = event("audited", Status.PROCESSED, old)
    AuditEntry.objects.create(actor_name="alice", action="replay", target="evt_audited",
                              event=audited, outcome="applied")
    user = User.objects.create_user("bob")
    listed = event("listed", Status.PROCESSED, old)
    in_done = event("in_done_bulk", Status.PROCESSED, old)
    BulkReplay.objects.create(requested_by=user, description="queued", status="queued",
                              event_ids=[listed.pk], total=1)
    BulkReplay.objects.create(requested_by=user, description="done", status="done",
                              event_ids=[in_done.pk], total=1, done=1)
    gone.append(in_done)  # a finished bulk replay needs its events no more
    logged = txlog(timedelta(hours=1), event=gone[0])  # a recent log of an old event

    result = retention.prune(batch=2)

    assert result.deleted == {"transaction_logs": 0, "events": 4, "attempts": 7}
    remaining = set(WebhookEvent.objects.values_list("pk", flat=True))
    assert remaining == {e.pk for e in [*unsettled, recent, audited, listed]}
    assert not WebhookEventAttempt.objects.filter(event_id__in=[e.pk for e in gone]).exists()
    assert WebhookEventAttempt.objects.count() == len(remaining)
    logged.refresh_from_db()
    assert logged.event_id is None  # the log stays, without its event (SET_NULL)


def test_dry_run_counts_and_deletes_nothing(settings: Any) -> None:
    settings.RETENTION_EVENT_DAYS = 31
    for _ in range(3):
        txlog(40 * DAY)
    event("old", Status.SKIPPED, 40 * DAY, attempts=2)
    code, out, err = command("prune", "--dry-run")
    assert code == 0, err
    assert "transaction logs older than 30 days: would delete 3" in out
    assert "settled events older than 31 days: would delete 1, with 2 attempts" in out
    assert TransactionLog.objects.count() == 3 and WebhookEvent.objects.count() == 1
    assert WebhookEventAttempt.objects.count() == 2
    run = JobRun.objects.get()
    assert (run.job, run.trigger, run.scope, run.apply) == ("prune", "command", "--dry-run",
                                                            False)

    code, out, _ = command("prune")
    assert "deleted 3" in out and "deleted 1, with 2 attempts" in out
    assert not TransactionLog.objects.exists() and not WebhookEvent.objects.exists()


def test_without_event_retention_the_command_says_events_are_kept() -> None:
    code, out, _ = command("prune")
    assert code == 0
    assert "events: kept (RETENTION_EVENT_DAYS is not set)" in out


@pytest.mark.django_db(transaction=True)
def test_a_locked_event_is_left_for_the_next_run_without_waiting(settings: Any,
                                                                  session: Any) -> None:
    """A real concurrent transaction holds the event's row (as processing or a replay
    does): the batch skips it instead of waiting, and the next run takes it."""
    settings.RETENTION_EVENT_DAYS = 31
    busy = event("busy", Status.PROCESSED, 40 * DAY)
    free = event("free", Status.PROCESSED, 40 * DAY)
    holder = session("read committed", name="processor")
    holder.run(f"SELECT id FROM {retention.EVENT} WHERE id = %s FOR UPDATE", [busy.pk])
    assert retention.prune().deleted["events"] == 1
    assert set(WebhookEvent.objects.values_list("pk", flat=True)) == {busy.pk}
    holder.commit()
    assert retention.prune().deleted["events"] == 1
    assert not WebhookEvent.objects.filter(pk__in=[busy.pk, free.pk]).exists()


def test_the_daily_job_needs_no_stripe_key(settings: Any) -> None:
    settings.STRIPE_API_KEY = ""
    assert jobs.intervals()["prune"] == timedelta(days=1)


def run_due_jobs(worker: str) -> None:
    """What a worker's schedule runs now: every due job, one after the other."""
    running = Worker(name=worker)
    for _ in jobs.intervals():
        running.run_due_job(wait=True)


@pytest.mark.django_db(transaction=True)
def test_workers_run_prune_daily_under_the_lease() -> None:
    old = txlog(31 * DAY)
    run_due_jobs("w1")
    run = JobRun.objects.get(job="prune")
    assert (run.trigger, run.status, run.counts["transaction_logs"]) == ("schedule", "ok", 1)
    assert run.runner.startswith("w1:")
    assert not TransactionLog.objects.filter(pk=old.pk).exists()
    lease = ScheduledJob.objects.get(name="prune")
    assert lease.leased_by == "" and lease.last_finished_at is not None

    # Not due again within the day, on any worker.
    txlog(31 * DAY)
    run_due_jobs("w2")
    assert JobRun.objects.filter(job="prune").count() == 1
    # A day later it is; while one runner holds the lease, no other gets it.
    ScheduledJob.objects.filter(name="prune").update(last_finished_at=timezone.now() - DAY)
    assert jobs.lease_due("prune", jobs.PRUNE_EVERY, "w3")
    run_due_jobs("w4")
    assert JobRun.objects.filter(job="prune").count() == 1
    jobs.lease_free("prune", "w3", done=False)  # w3 stopped before running it
    run_due_jobs("w5")
    assert JobRun.objects.filter(job="prune").count() == 2
    assert not TransactionLog.objects.exists()


@pytest.mark.parametrize(("name", "value", "message"), [
    ("RETENTION_TXLOG_DAYS", "0", "RETENTION_TXLOG_DAYS must be a whole number of days, at "
                                  "least 1"),
    ("RETENTION_TXLOG_DAYS", "a month", "RETENTION_TXLOG_DAYS must be a whole number"),
    ("RETENTION_EVENT_DAYS", "30", "RETENTION_EVENT_DAYS must be a whole number of days, at "
                                   "least 31 (Stripe lists events for 30 days"),
    ("RETENTION_EVENT_DAYS", "90.5", "RETENTION_EVENT_DAYS must be a whole number"),
])
def test_bad_retention_settings_are_refused(name: str, value: str, message: str) -> None:
    result = settings_in_subprocess("pass", **{name: value})
    assert result.returncode != 0
    assert message in result.stderr


def test_retention_settings_from_the_environment() -> None:
    result = settings_in_subprocess(
        "print(settings.RETENTION_TXLOG_DAYS, settings.RETENTION_EVENT_DAYS)",
        RETENTION_TXLOG_DAYS="7", RETENTION_EVENT_DAYS="365")
    assert result.stdout.strip() == "7 365", result.stderr
    result = settings_in_subprocess(
        "print(settings.RETENTION_TXLOG_DAYS, settings.RETENTION_EVENT_DAYS)")
    assert result.stdout.strip() == "30 None", result.stderr
