"""Scheduled jobs (sync_events, reconcile_payouts, prune): their lease and every run."""

from django.conf import settings
from django.db import models


class ScheduledJob(models.Model):
    """One row per job, leased by the worker running it: one runner at a time across
    every worker on every machine, with no session state (fine behind PgBouncer)."""

    name = models.CharField(max_length=32, primary_key=True)
    leased_by = models.CharField(max_length=128, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    last_finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name


class JobRun(models.Model):
    """One run of a job: scheduled, from the command line, or asked for in the console."""

    class Job(models.TextChoices):
        SYNC_EVENTS = "sync_events"
        RECONCILE_PAYOUTS = "reconcile_payouts"
        PRUNE = "prune"  # retention: old transaction logs (and settled events, if asked)

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule"  # a worker's schedule
        COMMAND = "command"  # manage.py
        CONSOLE = "console"  # a person, e.g. Resync from Stripe on a payout

    class Status(models.TextChoices):
        RUNNING = "running"
        OK = "ok"  # done; nothing drifted
        DRIFTED = "drifted"  # done; some payouts differ from Stripe (or Stripe lacks them)
        FAILED = "failed"  # stopped by an error (bad key, Stripe unreachable, ...)
        ABANDONED = "abandoned"  # its runner stopped (killed, or its lease was lost)

    job = models.CharField(max_length=32, choices=Job.choices)
    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL,
                                     null=True, blank=True, related_name="+")
    runner = models.CharField(max_length=128, blank=True, default="")  # host:pid
    scope = models.CharField(max_length=200, blank=True, default="")  # "--days 3", "po_…"
    apply = models.BooleanField(default=False)  # reconcile: drift was brought to Stripe's
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    counts = models.JSONField(default=dict, blank=True)
    # reconcile: one entry per drifted or missing payout; sync: one per account listed.
    findings = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True, default="")

    class Meta:
        indexes = [models.Index(fields=["job", "-started_at"])]

    def __str__(self) -> str:
        return f"{self.job} {self.started_at:%Y-%m-%d %H:%M} {self.status}"

    @property
    def duration(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()
