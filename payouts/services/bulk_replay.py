"""Bulk replays: asked for in the console, approved when they must be, run by the workers.

* Asking (``bulk_request``) freezes the list of events, so the count shown is exact and
  an approval covers exactly those events. On a live deployment, more than
  ``BULK_REPLAY_APPROVAL_THRESHOLD`` events wait for a second Support person
  (``bulk_decide``): never the one who asked, checked here, not only in the page.
* Running: a worker claims a queued job (or a running one whose lease ran out: its
  worker died) with one autocommitted UPDATE whose subquery skips rows another worker
  has locked (``FOR UPDATE SKIP LOCKED``). Nothing lives in a database session, so it
  works behind PgBouncer in transaction pooling. The worker replays the events one by
  one through ``event_replay`` as the person who asked, and every ``FLUSH_EVERY``
  events (or second) saves its position and counts, renews its lease and reads
  whether a cancel was asked for, in one UPDATE. A worker that dies leaves its lease to
  run out; the next one resumes at the saved position, so at most the events since the
  last save are replayed twice, which the processor makes harmless (an applied event
  is never applied again; the second replay counts it as skipped).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

from payouts.models import BulkReplay, WebhookEvent
from payouts.services import audit
from payouts.services.processing import event_replay

log = structlog.get_logger(__name__)

Status = BulkReplay.Status
REPLAY_PERMISSION = "payouts.replay_webhookevent"
LEASE = timedelta(minutes=2)  # renewed at every save, so far longer than one save apart
FLUSH_EVERY = 10  # events between saves of the position, counts and lease
FLUSH_EVERY_S = 1.0  # and at least this often, so the progress bar moves
MAX_REASON = 2000
BULK = BulkReplay._meta.db_table


class BulkReplayRefused(Exception):
    """A request the service refuses; ``status_code`` is the HTTP answer it deserves."""

    status_code = 400


class NotAllowed(BulkReplayRefused):
    status_code = 403


class WrongState(BulkReplayRefused):
    status_code = 409


class LeaseLost(Exception):
    """Another worker holds the job now: ours ran out while we were busy."""


def runner_name(worker: str) -> str:
    return f"{worker}:{secrets.token_hex(3)}"[:128]


def needs_approval(total: int) -> bool:
    return settings.STRIPE_LIVEMODE and total > settings.BULK_REPLAY_APPROVAL_THRESHOLD


def _check_may_replay(user: AbstractBaseUser) -> None:
    if not user.has_perm(REPLAY_PERMISSION):  # type: ignore[attr-defined]
        raise NotAllowed("only Support (who may replay events) can do this")


def _summary(job: BulkReplay) -> str:
    counts = ", ".join(f"{n} {kind}" for kind, n in job.counts.items() if n)
    return f"{job.description}: {job.done} of {job.total} replayed ({counts or 'none yet'})"


# --- asking, deciding, canceling ---------------------------------------------------------


def bulk_request(*, requested_by: AbstractBaseUser, event_ids: list[int],
                 filter_params: dict[str, Any], description: str) -> BulkReplay:
    """A bulk replay of exactly ``event_ids`` (in that order), queued for the workers or,
    when large on a live deployment, awaiting a second person's approval."""
    _check_may_replay(requested_by)
    if not event_ids:
        raise BulkReplayRefused("no event matches: nothing to replay")
    status = Status.AWAITING_APPROVAL if needs_approval(len(event_ids)) else Status.QUEUED
    job = BulkReplay.objects.create(
        requested_by=requested_by, filter_params=filter_params, description=description[:500],
        event_ids=event_ids, total=len(event_ids), status=status)
    audit.record(audit.Action.BULK_REPLAY, actor=requested_by, target=str(job),
                 outcome="requested", detail=f"{description}: {job.total} events, {status}")
    log.info("bulk_replay.requested", job=job.pk, user=requested_by.get_username(),
             total=job.total, status=status, description=description)
    return job


def bulk_decide(job_id: int, *, decided_by: AbstractBaseUser, approve: bool,
                reason: str) -> BulkReplay:
    """Four eyes: another Support person approves (it is queued) or rejects it, saying
    why. Raises ``BulkReplay.DoesNotExist`` for an unknown job."""
    _check_may_replay(decided_by)
    reason = reason.strip()
    if not reason:
        raise BulkReplayRefused("a reason is required to approve or reject a bulk replay")
    if len(reason) > MAX_REASON:
        raise BulkReplayRefused(f"the reason is longer than {MAX_REASON} characters")
    with transaction.atomic():
        job = BulkReplay.objects.select_for_update().get(pk=job_id)
        if job.requested_by_id == decided_by.pk:
            raise NotAllowed(f"you asked for {job}: another Support person must decide on it")
        if job.status != Status.AWAITING_APPROVAL:
            raise WrongState(f"{job} is {job.status}, not awaiting approval")
        job.status = Status.QUEUED if approve else Status.REJECTED
        job.decided_by, job.decision_reason, job.decided_at = decided_by, reason, timezone.now()
        job.finished_at = None if approve else job.decided_at
        job.save(update_fields=["status", "decided_by", "decision_reason", "decided_at",
                                "finished_at"])
    verdict = "approved" if approve else "rejected"
    audit.record(audit.Action.APPROVAL, actor=decided_by, target=str(job), outcome=verdict,
                 detail=f"{reason} ({job.description}: {job.total} events, asked by "
                        f"{job.requested_by.get_username()})")
    log.info("bulk_replay.decided", job=job.pk, user=decided_by.get_username(), verdict=verdict)
    return job


def bulk_cancel(job_id: int, *, requested_by: AbstractBaseUser) -> BulkReplay:
    """Stop a bulk replay: at once if no worker runs it yet, else at its worker's next
    save (within ``FLUSH_EVERY`` events)."""
    _check_may_replay(requested_by)
    with transaction.atomic():
        job = BulkReplay.objects.select_for_update().get(pk=job_id)
        if not job.active:
            raise WrongState(f"{job} is already {job.status}")
        job.cancel_requested = True
        if job.status != Status.RUNNING:
            job.status, job.finished_at = Status.CANCELED, timezone.now()
        job.save(update_fields=["cancel_requested", "status", "finished_at"])
    outcome = "canceled" if job.status == Status.CANCELED else "cancel_requested"
    audit.record(audit.Action.BULK_REPLAY, actor=requested_by, target=str(job),
                 outcome=outcome, detail=_summary(job))
    log.info("bulk_replay.cancel", job=job.pk, user=requested_by.get_username(), outcome=outcome)
    return job


# --- the workers -----------------------------------------------------------------------------

CLAIM_SQL = f"""
UPDATE {BULK} SET status = 'running', leased_by = %(runner)s, lease_until = now() + %(lease)s,
    started_at = COALESCE(started_at, now())
WHERE id = (
    SELECT id FROM {BULK}
    WHERE status = 'queued' OR (status = 'running' AND lease_until < now())
    ORDER BY requested_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id"""
SAVE_SQL = f"""
UPDATE {BULK} SET done = %(done)s, applied = %(applied)s, skipped = %(skipped)s,
    held = %(held)s, failed = %(failed)s, ignored = %(ignored)s, retry = %(retry)s,
    lease_until = now() + %(lease)s
WHERE id = %(id)s AND leased_by = %(runner)s AND status = 'running'
RETURNING cancel_requested"""
FINISH_SQL = f"""
UPDATE {BULK} SET status = %(status)s, finished_at = now(), leased_by = '', lease_until = NULL
WHERE id = %(id)s AND leased_by = %(runner)s AND status = 'running'"""
LET_GO_SQL = f"""
UPDATE {BULK} SET lease_until = now()
WHERE id = %(id)s AND leased_by = %(runner)s AND status = 'running'"""


def claim(runner: str) -> int | None:
    """Lease the oldest queued bulk replay, or one whose worker died; its id, or None."""
    with connection.cursor() as cursor:
        cursor.execute(CLAIM_SQL, {"runner": runner, "lease": LEASE})
        row = cursor.fetchone()
    return int(row[0]) if row else None


def _save(job_id: int, runner: str, done: int, counts: dict[str, int]) -> bool:
    """Save the position and counts and renew the lease; True if a cancel was asked for.
    Raises ``LeaseLost`` when another worker took the job."""
    with connection.cursor() as cursor:
        cursor.execute(SAVE_SQL, {"id": job_id, "runner": runner, "done": done,
                                  "lease": LEASE, **counts})
        row = cursor.fetchone()
    if row is None:
        raise LeaseLost(f"bulk replay {job_id}: its lease passed to another worker")
    return bool(row[0])


def run(job_id: int, runner: str, *, stopping: Callable[[], bool] = lambda: False) -> BulkReplay:
    """Replay the leased job's events from its saved position until all are done, a
    cancel is asked for, or the worker stops (then the lease is let go at once, so
    another worker resumes it)."""
    job = BulkReplay.objects.select_related("requested_by").get(pk=job_id)
    done, counts = job.done, job.counts
    detail = f" (bulk replay {job.pk})"
    log.info("bulk_replay.started", job=job.pk, runner=runner, done=done, total=job.total)
    canceled = _save(job.pk, runner, done, counts)
    saved_at, saved_done = time.monotonic(), done
    while not canceled and done < job.total:
        if stopping():  # save where it is, and let another worker resume at once
            _save(job.pk, runner, done, counts)
            _execute(LET_GO_SQL, {"id": job.pk, "runner": runner})
            log.info("bulk_replay.let_go", job=job.pk, runner=runner, done=done)
            return job
        try:
            kind = str(event_replay(event_id=job.event_ids[done], requested_by=job.requested_by,
                                    detail=detail).kind)
        except WebhookEvent.DoesNotExist:  # deleted since it was asked for
            kind = "failed"
        counts[kind] = counts.get(kind, 0) + 1
        done += 1
        if done - saved_done >= FLUSH_EVERY or time.monotonic() - saved_at >= FLUSH_EVERY_S:
            canceled = _save(job.pk, runner, done, counts)
            saved_at, saved_done = time.monotonic(), done
    if done != saved_done:
        canceled = _save(job.pk, runner, done, counts) or canceled
    status = Status.CANCELED if canceled and done < job.total else Status.DONE
    _execute(FINISH_SQL, {"id": job.pk, "runner": runner, "status": status})
    job.refresh_from_db()
    audit.record(audit.Action.BULK_REPLAY, actor=job.requested_by, target=str(job),
                 outcome=status, detail=_summary(job))
    log.info("bulk_replay.finished", job=job.pk, status=status, done=done, total=job.total,
             **counts)
    return job


def run_next(worker: str, *, stopping: Callable[[], bool] = lambda: False) -> BulkReplay | None:
    """Claim one bulk replay and run it; None when none is waiting."""
    runner = runner_name(worker)
    job_id = claim(runner)
    return None if job_id is None else run(job_id, runner, stopping=stopping)


def _execute(sql: str, params: dict[str, Any]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
