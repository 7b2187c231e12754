"""The inbox worker: claims due events with SKIP LOCKED and runs the processor on them.

Safe with any number of workers on any number of machines: a claim is one
statement that skips rows another worker has locked and leases what it takes
(``next_attempt_at`` moves a lease ahead), so a worker killed mid-event only
delays that event until its lease runs out; then any worker takes it again.
Processing itself is idempotent, so a lease that runs out while its worker is
still busy costs a second attempt, never a second effect.
"""

from __future__ import annotations

import os
import socket
import time

import structlog
from django.conf import settings
from django.db import close_old_connections, connection

from payouts.models import WebhookEvent, WebhookEventAttempt
from payouts.services.processing import event_process

log = structlog.get_logger(__name__)

TABLE = WebhookEvent._meta.db_table

CLAIM_SQL = f"""
WITH due AS (
    SELECT id FROM {TABLE}
    WHERE status IN ('received', 'failed') AND next_attempt_at <= now() AND attempts < %(max)s
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {TABLE} AS event
SET attempts = event.attempts + 1,
    next_attempt_at = now() + make_interval(secs => %(lease)s)
FROM due WHERE event.id = due.id
RETURNING event.id
"""

# Events whose every attempt died with its worker (the lease ran out each time).
BURY_SQL = f"""
UPDATE {TABLE}
SET status = 'dead', next_attempt_at = NULL,
    last_error = 'attempts exhausted: its workers stopped before finishing it'
WHERE status IN ('received', 'failed') AND next_attempt_at <= now() AND attempts >= %(max)s
"""


class Worker:
    def __init__(self, *, batch_size: int = 1, idle_sleep_s: float = 0.5,
                 name: str | None = None) -> None:
        self.batch_size = batch_size
        self.idle_sleep_s = idle_sleep_s
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._stopping = False

    def stop(self) -> None:
        """Finish the event in hand, then leave (called from a signal handler)."""
        self._stopping = True

    def claim(self) -> list[int]:
        params = {"max": settings.WEBHOOK_MAX_ATTEMPTS, "limit": self.batch_size,
                  "lease": settings.WEBHOOK_LEASE_SECONDS}
        with connection.cursor() as cursor:
            cursor.execute(BURY_SQL, params)
            if cursor.rowcount:
                log.warning("worker.events_buried", count=cursor.rowcount)
            cursor.execute(CLAIM_SQL, params)
            return [row[0] for row in cursor.fetchall()]

    def run(self, *, once: bool = False) -> int:
        """Process due events until stopped (or, with ``once``, until none is due)."""
        handled = 0
        log.info("worker.started", worker=self.name, once=once)
        while not self._stopping:
            close_old_connections()  # as Django does per request: drop a broken connection
            try:
                claimed = self.claim()
            except Exception:
                log.exception("worker.claim_failed", worker=self.name)
                claimed = []
                if once:
                    raise
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
        log.info("worker.stopped", worker=self.name, handled=handled)
        return handled
