"""sync_events, reconcile_payouts and prune as jobs (each run recorded), and the workers'
schedule, which also runs check_alerts.

Every run, from the command line, the console or a worker's schedule, is a
``JobRun`` row: started, finished, status, counts and findings (the health and
Reconciliation pages show them).

Workers run each job every ``SYNC_EVENTS_MINUTES`` / ``RECONCILE_MINUTES`` when
``STRIPE_API_KEY`` is set, ``check_alerts`` every ``ALERT_CHECK_MINUTES`` always (its
runs are not recorded as ``JobRun`` rows, a minute's each: the alerts it opens and
resolves are its record, and the log), and ``prune`` (retention) daily, with or without
a key. One runner at a time across every worker on every machine:
a worker first leases the job's ``ScheduledJob`` row with one UPDATE (autocommit, no
session state, so it works behind PgBouncer in transaction pooling), renews the lease
while it runs and frees it when done. A runner that dies leaves its lease to run out
(``LEASE``); the next worker marks its run abandoned and runs the job. Runs asked for
by a person do not take the lease: every job is idempotent (an event is stored once;
a resync moves a payout only to Stripe's state; prune deletes only what is old), so
running beside the schedule costs
Stripe requests and, at worst, a second resync event on a payout's timeline.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import structlog
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.utils import timezone

from payouts.models import JobRun, Payout, ScheduledJob, WebhookEvent
from payouts.services import alerts, inbox, retention, stripe_sync
from payouts.stripe_api import StripeNotConfigured, StripeReader, StripeReadError, stripe_client

log = structlog.get_logger(__name__)

Job = JobRun.Job
Trigger = JobRun.Trigger
RunStatus = JobRun.Status
LEASE = timedelta(minutes=2)
RENEW_EVERY_S = 20.0
SCHEDULE_CHECK_S = 10.0  # how often a worker looks for a due job
CONSOLE_TIMEOUT_S = 10.0
PRUNE_EVERY = timedelta(days=1)
# Errors that end a run with its reason shown: Stripe's answer, not a bug.
STRIPE_TROUBLE = (StripeNotConfigured, StripeReadError)
SCHEDULED = ScheduledJob._meta.db_table
CHECK_ALERTS = "check_alerts"  # a scheduled job with no JobRun record (alerts.check)


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


class Result(Protocol):
    """What a job's run collects as it goes (``stripe_sync.SyncResult``, ``ReconcileResult``)."""

    def counts(self) -> dict[str, int]: ...
    def findings(self) -> list[dict[str, Any]]: ...
    def problems(self) -> str: ...
    def status(self) -> str: ...


def _recorded(run: JobRun, result: Result, work: Callable[[], object]) -> JobRun:
    """Do ``work``, which fills ``result``, and keep on ``run`` how it ended, with what
    it found so far also when it stopped early."""
    try:
        work()
        run.status, run.error = result.status(), result.problems()
    except STRIPE_TROUBLE as exc:
        run.status, run.error = RunStatus.FAILED, str(exc)
        log.error("job.failed", job=run.job, run=run.pk, error=str(exc))
    except LeaseLost as exc:
        run.status, run.error = RunStatus.ABANDONED, str(exc)
        log.warning("job.abandoned", job=run.job, run=run.pk, reason=str(exc))
    except Exception as exc:
        run.status, run.error = RunStatus.FAILED, f"{type(exc).__name__}: {exc}"
        log.exception("job.crashed", job=run.job, run=run.pk)
    except BaseException:  # Ctrl-C, SystemExit: recorded, then on its way
        run.status, run.error = RunStatus.ABANDONED, "interrupted"
        _save(run, result)
        raise
    _save(run, result)
    log.info("job.finished", job=run.job, run=run.pk, status=run.status, **run.counts)
    return run


def _save(run: JobRun, result: Result) -> None:
    run.counts, run.findings = result.counts(), result.findings()
    run.error = run.error[:4000]
    run.finished_at = timezone.now()
    run.save(update_fields=["status", "counts", "findings", "error", "finished_at"])


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
    result = stripe_sync.SyncResult()
    return _recorded(run, result, lambda: stripe_sync.sync_events(
        days=days, origin=origin, reader=StripeReader(), tick=tick, result=result))


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
    result = stripe_sync.ReconcileResult()
    # A person waits on a console resync: one short try, not a minute of retries.
    reader = (StripeReader(stripe_client(timeout_s=CONSOLE_TIMEOUT_S), attempts=1)
              if trigger == Trigger.CONSOLE else StripeReader())
    return _recorded(run, result, lambda: stripe_sync.reconcile(
        payouts if payouts is not None else stripe_sync.payouts_to_reconcile(), apply=apply,
        origin=origin, reader=reader, tick=tick, result=result))


def prune(*, trigger: str, dry_run: bool = False, requested_by: AbstractBaseUser | None = None,
          runner: str = "", tick: stripe_sync.Tick = stripe_sync.quiet) -> JobRun:
    """A recorded run of ``retention.prune``."""
    run = _start(Job.PRUNE, trigger=trigger, requested_by=requested_by,
                 scope="--dry-run" if dry_run else "", apply=not dry_run,
                 runner=runner or runner_name())
    result = retention.PruneResult()
    return _recorded(run, result, lambda: retention.prune(dry_run=dry_run, tick=tick,
                                                          result=result))


def scheduled_sync_days() -> int:
    """How far back a scheduled sync lists: SYNC_EVENTS_DAYS, or back to the start of
    the last run that listed every account (up to Stripe's 30 days), so an outage of
    the workers longer than SYNC_EVENTS_DAYS loses nothing Stripe still keeps."""
    last_ok = (JobRun.objects.filter(job=Job.SYNC_EVENTS, status=RunStatus.OK)
               .order_by("-started_at").values_list("started_at", flat=True).first())
    days = settings.SYNC_EVENTS_DAYS
    if last_ok is not None:
        days = max(days, min(stripe_sync.SYNC_MAX_DAYS, (timezone.now() - last_ok).days + 1))
    return int(days)


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
    """The scheduled jobs and how often each runs: the alerts and retention always, the
    jobs that ask Stripe only with an API key; retention last."""
    scheduled = {CHECK_ALERTS: timedelta(minutes=settings.ALERT_CHECK_MINUTES)}
    if settings.STRIPE_API_KEY:
        scheduled |= {Job.SYNC_EVENTS: timedelta(minutes=settings.SYNC_EVENTS_MINUTES),
                      Job.RECONCILE_PAYOUTS: timedelta(minutes=settings.RECONCILE_MINUTES)}
    return {**scheduled, Job.PRUNE: PRUNE_EVERY}


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
    """A job run by a worker's schedule. A thread renews its lease every RENEW_EVERY_S
    while it runs; the job stops at its next step when the lease is lost or the worker
    stops."""

    def __init__(self, name: str, worker: str, stopping: Callable[[], bool]) -> None:
        self.name = name
        self.runner = f"{worker}:{secrets.token_hex(3)}"[:128]
        self.stopping = stopping
        self.lost = False
        self._done = threading.Event()

    def tick(self, message: str) -> None:
        if self.stopping():
            raise LeaseLost("the worker is stopping")
        if self.lost:
            raise LeaseLost("its lease could not be renewed; another runner may hold the job")

    def _renew(self) -> None:
        try:
            while not self._done.wait(RENEW_EVERY_S):
                if not _execute(RENEW_SQL, {"name": self.name, "runner": self.runner,
                                            "lease": LEASE}):
                    self.lost = True
                    return
        except Exception:
            log.exception("job.lease_renewal_failed", job=self.name)
            self.lost = True
        finally:
            connection.close()  # this thread's own connection

    def run(self) -> JobRun | None:
        """Run the leased job, then free it: next due an interval from now, or at once if
        it was interrupted. The job's record, or None for check_alerts (which has none)."""
        if self.name == CHECK_ALERTS:
            self._check_alerts()
            return None
        renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.name}")
        renewer.start()
        run: JobRun | None = None
        try:
            if self.name == Job.SYNC_EVENTS:
                run = sync_events(days=scheduled_sync_days(), trigger=Trigger.SCHEDULE,
                                  runner=self.runner, tick=self.tick)
            elif self.name == Job.PRUNE:
                run = prune(trigger=Trigger.SCHEDULE, runner=self.runner, tick=self.tick)
            else:
                run = reconcile_payouts(apply=True, trigger=Trigger.SCHEDULE,
                                        runner=self.runner, tick=self.tick)
        finally:
            self._done.set()
            renewer.join()
            interrupted = run is None or run.status == RunStatus.ABANDONED
            lease_free(self.name, self.runner, done=not interrupted)
        assert run is not None
        return run


    def _check_alerts(self) -> None:
        """One check, well within its lease (deliveries time out in seconds). A failed
        check is logged and tried again at the next interval."""
        try:
            alerts.check(alerts.Evaluation())
        except Exception:
            log.exception("alerts.check_failed", runner=self.runner)
        finally:
            lease_free(self.name, self.runner, done=True)


def next_due(worker: str, stopping: Callable[[], bool],
             running: frozenset[str] = frozenset()) -> Scheduled | None:
    """The first scheduled job that is due, not ``running`` here already, and that this
    worker could lease."""
    for name, interval in intervals().items():
        if name in running:
            continue
        job = Scheduled(name, worker, stopping)
        if lease_due(name, interval, job.runner):
            return job
    return None
