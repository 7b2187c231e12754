"""sync_events and reconcile_payouts as jobs: each run recorded, and the workers' schedule.

Every run, from the command line, the console or a worker's schedule, is a
``JobRun`` row: started, finished, status, counts and findings (the health and
Reconciliation pages show them).

Workers run each job every ``SYNC_EVENTS_MINUTES`` / ``RECONCILE_MINUTES`` when
``STRIPE_API_KEY`` is set. One runner at a time across every worker on every machine:
a worker first leases the job's ``ScheduledJob`` row with one UPDATE (autocommit, no
session state, so it works behind PgBouncer in transaction pooling), renews the lease
while it runs and frees it when done. A runner that dies leaves its lease to run out
(``LEASE``); the next worker marks its run abandoned and runs the job. Runs asked for
by a person do not take the lease: both jobs are idempotent, so running beside the
schedule costs Stripe requests, never a second effect.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.utils import timezone

from payouts.models import JobRun, Payout, ScheduledJob, WebhookEvent
from payouts.services import inbox, stripe_sync
from payouts.stripe_api import StripeNotConfigured, StripeReader, StripeReadError

log = structlog.get_logger(__name__)

Job = JobRun.Job
Trigger = JobRun.Trigger
RunStatus = JobRun.Status
LEASE = timedelta(minutes=2)
RENEW_EVERY_S = 20.0
SCHEDULE_CHECK_S = 10.0  # how often a worker looks for a due job
# Errors that end a run with its reason shown: Stripe's answer, not a bug.
STRIPE_TROUBLE = (StripeNotConfigured, StripeReadError)
SCHEDULED = f"{ScheduledJob._meta.db_table}"


class LeaseLost(Exception):
    """Another runner holds the job now (ours ran out), or the worker is stopping."""


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _who(trigger: str, requested_by: AbstractBaseUser | None) -> str:
    if requested_by is not None:
        return f"by {requested_by.get_username()}"
    return {Trigger.SCHEDULE: "scheduled", Trigger.COMMAND: "command line"}.get(trigger, trigger)


class Progress:
    """A tick for the command line: the latest progress, at most every few seconds."""

    def __init__(self, write: Callable[[str], Any], every_s: float = 5.0) -> None:
        self.write = write
        self.every_s = every_s
        self._last = time.monotonic()

    def __call__(self, message: str) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.write(message)
            self._last = time.monotonic()


@dataclass(frozen=True)
class Finished:
    status: str
    counts: dict[str, Any]
    findings: list[dict[str, Any]]


def _recorded(run: JobRun, work: Callable[[stripe_sync.Tick], Finished],
              tick: stripe_sync.Tick) -> JobRun:
    """Do ``work`` and keep how it ended on ``run``."""
    try:
        finished = work(tick)
        run.status, run.counts, run.findings = finished.status, finished.counts, finished.findings
    except STRIPE_TROUBLE as exc:
        run.status, run.error = RunStatus.FAILED, str(exc)
        log.error("job.failed", job=run.job, run=run.pk, error=str(exc))
    except LeaseLost as exc:
        run.status, run.error = RunStatus.ABANDONED, str(exc)
        log.warning("job.abandoned", job=run.job, run=run.pk, reason=str(exc))
    except Exception as exc:
        run.status, run.error = RunStatus.FAILED, f"{type(exc).__name__}: {exc}"
        log.exception("job.crashed", job=run.job, run=run.pk)
    run.finished_at = timezone.now()
    run.save(update_fields=["status", "counts", "findings", "error", "finished_at"])
    log.info("job.finished", job=run.job, run=run.pk, status=run.status, **run.counts)
    return run


def _start(job: str, *, trigger: str, requested_by: AbstractBaseUser | None, scope: str,
           apply: bool, runner: str) -> JobRun:
    return JobRun.objects.create(job=job, trigger=trigger, requested_by=requested_by,
                                 runner=runner, scope=scope, apply=apply,
                                 started_at=timezone.now())


def sync_events(*, days: int, trigger: str, requested_by: AbstractBaseUser | None = None,
                runner: str = "", tick: stripe_sync.Tick = stripe_sync.quiet) -> JobRun:
    """A recorded run of ``stripe_sync.sync_events``."""
    run = _start(Job.SYNC_EVENTS, trigger=trigger, requested_by=requested_by,
                 scope=f"--days {days}", apply=True, runner=runner or runner_name())
    origin = inbox.Origin(WebhookEvent.Source.EVENTS_API,
                          f"sync_events ({_who(trigger, requested_by)})",
                          requested_by.pk if requested_by is not None else None)

    def work(tick: stripe_sync.Tick) -> Finished:
        result = stripe_sync.sync_events(days=days, origin=origin, reader=StripeReader(),
                                         tick=tick)
        accounts = [vars(a) for a in result.accounts if a.listed or a.error]
        # Accounts Stripe would not list: their missed events cannot be known.
        run.error = "; ".join(a.error for a in result.accounts if a.error)[:4000]
        status = RunStatus.FAILED if run.error else RunStatus.OK
        return Finished(status, result.totals(), accounts)

    return _recorded(run, work, tick)


def reconcile_payouts(*, apply: bool, trigger: str, requested_by: AbstractBaseUser | None = None,
                      payouts: list[Payout] | None = None, runner: str = "",
                      tick: stripe_sync.Tick = stripe_sync.quiet) -> JobRun:
    """A recorded run of ``stripe_sync.reconcile``: every payout it picks, or ``payouts``."""
    scope = ", ".join(str(p) for p in payouts) if payouts is not None else ""
    run = _start(Job.RECONCILE_PAYOUTS, trigger=trigger, requested_by=requested_by,
                 scope=scope[:200], apply=apply, runner=runner or runner_name())
    who = _who(trigger, requested_by)
    detail = (f"Resync from Stripe {who}" if trigger == Trigger.CONSOLE
              else f"reconcile_payouts --apply ({who})")
    origin = inbox.Origin(WebhookEvent.Source.RESYNC, detail,
                          requested_by.pk if requested_by is not None else None)

    def work(tick: stripe_sync.Tick) -> Finished:
        chosen = payouts if payouts is not None else stripe_sync.payouts_to_reconcile()
        result = stripe_sync.reconcile(chosen, apply=apply, origin=origin,
                                       reader=StripeReader(), tick=tick)
        # Payouts Stripe could not answer for: "nothing drifted" cannot be said.
        run.error = "; ".join(result.errors)[:4000]
        status = (RunStatus.DRIFTED if result.drifts
                  else RunStatus.FAILED if result.errors else RunStatus.OK)
        return Finished(status, result.counts(), stripe_sync.drift_findings(result))

    return _recorded(run, work, tick)


# --- the schedule --------------------------------------------------------------------------

CLAIM_SQL = f"""
UPDATE {SCHEDULED} SET leased_by = %(runner)s, lease_until = now() + %(lease)s
WHERE name = %(name)s
  AND (lease_until IS NULL OR lease_until < now())
  AND (last_finished_at IS NULL OR last_finished_at <= now() - %(interval)s)
RETURNING name"""
RENEW_SQL = f"""
UPDATE {SCHEDULED} SET lease_until = now() + %(lease)s
WHERE name = %(name)s AND leased_by = %(runner)s RETURNING name"""
FREE_SQL = f"""
UPDATE {SCHEDULED} SET leased_by = '', lease_until = NULL,
    last_finished_at = CASE WHEN %(done)s THEN now() ELSE last_finished_at END
WHERE name = %(name)s AND leased_by = %(runner)s"""


def intervals() -> dict[str, timedelta]:
    """The scheduled jobs and how often each runs; none without an API key."""
    if not settings.STRIPE_API_KEY:
        return {}
    return {Job.SYNC_EVENTS: timedelta(minutes=settings.SYNC_EVENTS_MINUTES),
            Job.RECONCILE_PAYOUTS: timedelta(minutes=settings.RECONCILE_MINUTES)}


def check_every_s() -> float:
    """How often a worker looks for a due job: every 10 s, sooner for short intervals."""
    return min([SCHEDULE_CHECK_S, *(i.total_seconds() / 2 for i in intervals().values())])


def _execute(sql: str, params: dict[str, Any]) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount > 0


def lease_due(name: str, interval: timedelta, runner: str) -> bool:
    """Lease the job if it is due and no one holds it; True when this runner got it."""
    ScheduledJob.objects.get_or_create(name=name)
    got = _execute(CLAIM_SQL, {"name": name, "runner": runner, "lease": LEASE,
                               "interval": interval})
    if got:  # a scheduled run still "running" had a runner that died
        JobRun.objects.filter(job=name, trigger=Trigger.SCHEDULE,
                              status=RunStatus.RUNNING).update(
            status=RunStatus.ABANDONED, finished_at=timezone.now(),
            error="its runner stopped before finishing (its lease ran out)")
    return got


def lease_free(name: str, runner: str, *, done: bool) -> None:
    """Give the job's lease back; ``done``: it is next due an interval from now (else at
    once: the run was interrupted)."""
    _execute(FREE_SQL, {"name": name, "runner": runner, "done": done})


class Scheduled:
    """A job run by a worker's schedule: renews its lease as the job reports progress."""

    def __init__(self, name: str, worker: str, stopping: Callable[[], bool]) -> None:
        self.name = name
        self.runner = f"{worker}:{secrets.token_hex(3)}"[:128]
        self.stopping = stopping
        self._renewed = time.monotonic()

    def tick(self, message: str) -> None:
        if self.stopping():
            raise LeaseLost("the worker is stopping")
        if time.monotonic() - self._renewed < RENEW_EVERY_S:
            return
        if not _execute(RENEW_SQL, {"name": self.name, "runner": self.runner, "lease": LEASE}):
            raise LeaseLost("its lease ran out and another runner may hold the job")
        self._renewed = time.monotonic()

    def run(self) -> JobRun:
        """Run the leased job, then free it (and set when it is next due)."""
        try:
            if self.name == Job.SYNC_EVENTS:
                run = sync_events(days=settings.SYNC_EVENTS_DAYS, trigger=Trigger.SCHEDULE,
                                  runner=self.runner, tick=self.tick)
            else:
                run = reconcile_payouts(apply=True, trigger=Trigger.SCHEDULE,
                                        runner=self.runner, tick=self.tick)
        finally:
            lease_free(self.name, self.runner, done=not self.stopping())
        return run


def next_due(worker: str, stopping: Callable[[], bool]) -> Scheduled | None:
    """The first scheduled job that is due and that this worker could lease."""
    for name, interval in intervals().items():
        job = Scheduled(name, worker, stopping)
        if lease_due(name, interval, job.runner):
            return job
    return None
