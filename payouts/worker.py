"""The inbox worker: claims due events with SKIP LOCKED and runs the processor on them.

Safe with any number of workers on any number of machines: a claim is one
statement that skips rows another worker has locked and leases what it takes
(``next_attempt_at`` moves a lease ahead), so a worker killed mid-event only
delays that event until its lease runs out; then the abandoned attempt is put on
the event's timeline as failed, and the event is retried by the inbox's policy.
Processing itself is idempotent, so a lease that runs out while its worker is
still busy costs a second attempt, never a second effect.

A worker also runs the scheduled jobs when they are due and it gets their lease
(``payouts.services.jobs``): check_alerts always, prune (retention) daily, and with
``STRIPE_API_KEY`` set sync_events and reconcile_payouts --apply, each in a thread of its
own beside the event loop (a long reconcile does not hold the alerts up). Bulk replays
asked for in the console run the same way, one at a time per worker, in a thread of their
own (``payouts.services.bulk_replay``).
"""

from __future__ import annotations

import threading
import time

import structlog
from django.db import close_old_connections, connection

from payouts.models import WebhookEventAttempt
from payouts.services import bulk_replay, inbox, jobs
from payouts.services.processing import event_process

log = structlog.get_logger(__name__)

JOB_STOP_WAIT_S = 60.0  # on stop, how long to wait for a running job to notice
BULK_CHECK_S = 1.0  # how often an idle worker looks for a queued bulk replay


class Worker:
    def __init__(self, *, batch_size: int = 1, idle_sleep_s: float = 0.5,
                 name: str | None = None) -> None:
        self.batch_size = batch_size
        self.idle_sleep_s = idle_sleep_s
        self.name = name or jobs.runner_name()
        self._stopping = False
        self._jobs: dict[str, threading.Thread] = {}  # scheduled jobs running, by name
        self._schedule_checked = 0.0
        self._bulk: threading.Thread | None = None
        self._bulk_checked = 0.0

    def stop(self) -> None:
        """Finish the event in hand, then leave (called from a signal handler)."""
        self._stopping = True

    def claim(self) -> list[int]:
        """Settle the attempts of workers that died, then lease due events to this one."""
        inbox.settle_abandoned()
        return inbox.claim_due(worker=self.name, limit=self.batch_size)

    def run(self, *, once: bool = False) -> int:
        """Process due events until stopped (or, with ``once``, until none is due)."""
        handled = 0
        log.info("worker.started", worker=self.name, once=once,
                 scheduled={str(name): str(every) for name, every in jobs.intervals().items()})
        while not self._stopping:
            close_old_connections()  # as Django does per request: drop a broken connection
            try:
                claimed = self.claim()
            except Exception:
                log.exception("worker.claim_failed", worker=self.name)
                claimed = []
                if once:
                    raise
            self.run_due_job(wait=once)
            self.run_bulk_replay(wait=once)
            for event_id in claimed:
                if self._stopping:
                    break  # its lease runs out and another worker takes it
                try:
                    event_process(event_id=event_id, trigger=WebhookEventAttempt.Trigger.WORKER,
                                  worker=self.name)
                    handled += 1
                except Exception:  # e.g. the database went away; the lease brings it back
                    log.exception("worker.event_crashed", worker=self.name, event_pk=event_id)
            if not claimed:
                if once:
                    break
                time.sleep(self.idle_sleep_s)
        for thread in (*self._jobs.values(), self._bulk):
            if thread is not None:
                thread.join(JOB_STOP_WAIT_S)
        log.info("worker.stopped", worker=self.name, handled=handled)
        return handled

    def run_due_job(self, *, wait: bool = False) -> None:
        """Start a scheduled job that is due, if this worker gets its lease and is not
        running that job already; ``wait`` runs it to the end first (``--once``)."""
        now = time.monotonic()
        if not wait and now - self._schedule_checked < jobs.check_every_s():
            return
        self._schedule_checked = now
        running = frozenset(name for name, thread in self._jobs.items() if thread.is_alive())
        try:
            job = jobs.next_due(self.name, lambda: self._stopping, running)
        except Exception:
            log.exception("worker.schedule_failed", worker=self.name)
            return
        if job is None:
            return
        thread = threading.Thread(target=self._run_job, args=(job,), daemon=True,
                                  name=f"job-{job.name}")
        self._jobs[job.name] = thread
        thread.start()
        if wait:
            thread.join()

    def run_bulk_replay(self, *, wait: bool = False) -> None:
        """Claim a queued bulk replay (or one whose worker died) if this worker runs none,
        and run it in a thread; ``wait`` runs every waiting one to the end first
        (``--once``)."""
        now = time.monotonic()
        if (self._bulk is not None and self._bulk.is_alive()) or (
                not wait and now - self._bulk_checked < BULK_CHECK_S):
            return
        self._bulk_checked = now
        while not self._stopping:
            runner = bulk_replay.runner_name(self.name)
            try:
                job_id = bulk_replay.claim(runner)  # one cheap query: on this connection
            except Exception:
                log.exception("worker.bulk_claim_failed", worker=self.name)
                return
            if job_id is None:
                return
            if not wait:
                self._bulk = threading.Thread(target=self._run_bulk, args=(job_id, runner),
                                              daemon=True, name=f"bulk-replay-{job_id}")
                self._bulk.start()
                return
            self._run_bulk(job_id, runner, own_thread=False)

    def _run_bulk(self, job_id: int, runner: str, *, own_thread: bool = True) -> None:
        try:
            bulk_replay.run(job_id, runner, stopping=lambda: self._stopping)
        except Exception:  # its lease runs out and a worker resumes it
            log.exception("worker.bulk_replay_crashed", worker=self.name, job=job_id)
        finally:
            if own_thread:
                connection.close()  # this thread's own connection

    def _run_job(self, job: jobs.Scheduled) -> None:
        try:
            job.run()
        except Exception:
            log.exception("worker.job_crashed", worker=self.name, job=job.name)
        finally:
            connection.close()  # this thread's own connection
