"""Retention: old transaction logs, and old settled events with their attempts, deleted in
short batches (``manage.py prune``, and the workers' daily ``prune`` job).

* ``TransactionLog`` rows whose transaction started more than ``RETENTION_TXLOG_DAYS``
  ago.
* Only when ``RETENTION_EVENT_DAYS`` is set (unset: events are kept forever, they are
  evidence): events received more than that long ago and settled (processed, skipped,
  ignored; never received, failed, held or dead), with their attempts. An event is kept
  while an audit entry names it (a person acted on it) or an active bulk replay lists it;
  a transaction log still pointing at one loses the pointer (as Django's ``SET_NULL``
  would).

Each batch is one short READ COMMITTED transaction that deletes at most ``BATCH_ROWS``
rows: the oldest ones left, read through the date's index from where the last batch
stopped (keyset, not primary-key ranges: a log's id follows its transaction's end, not
its start, and ids of concurrent inserts interleave). Plain DELETEs, no table rewrite, no
lock beyond the rows deleted; autovacuum makes the space reusable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from payouts.models import AuditEntry, BulkReplay, TransactionLog, WebhookEvent, WebhookEventAttempt
from payouts.services.stripe_sync import Tick, quiet

log = structlog.get_logger(__name__)

BATCH_ROWS = 5000
PAUSE_RATIO = 1.0  # after each batch, a pause this many times as long as the batch took
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # before anything stored
TXLOG = TransactionLog._meta.db_table
EVENT = WebhookEvent._meta.db_table
ATTEMPT = WebhookEventAttempt._meta.db_table
AUDIT = AuditEntry._meta.db_table
BULK = BulkReplay._meta.db_table
SETTLED = tuple(str(s) for s in (WebhookEvent.Status.PROCESSED, WebhookEvent.Status.SKIPPED,
                                 WebhookEvent.Status.IGNORED))
ACTIVE_BULK = tuple(str(s) for s in BulkReplay.ACTIVE)

# Old enough, from where the last batch stopped (``after``: its newest date; ties with it
# not deleted yet are taken again, deleted rows are gone).
TXLOG_OLD = f"""
SELECT id FROM {TXLOG} WHERE started_at >= %(after)s AND started_at < %(cutoff)s"""
# Settled, old, and needed by nothing; one being processed or replayed right now (its row
# locked) is left for the next run.
EVENT_OLD = f"""
SELECT e.id, e.received_at FROM {EVENT} e
WHERE e.received_at >= %(after)s AND e.received_at < %(cutoff)s
  AND e.status IN %(settled)s
  AND NOT EXISTS (SELECT 1 FROM {AUDIT} a WHERE a.event_id = e.id)
  AND e.id NOT IN (SELECT unnest(b.event_ids) FROM {BULK} b WHERE b.status IN %(active)s)"""

# Each batch answers: rows deleted, the newest date it reached, attempts deleted.
TXLOG_BATCH_SQL = f"""
WITH gone AS (
    DELETE FROM {TXLOG} WHERE id IN ({TXLOG_OLD} ORDER BY started_at LIMIT %(batch)s)
    RETURNING started_at)
SELECT count(*), max(started_at), 0 FROM gone"""
# The attempts deleted too and transaction logs' pointers cleared: no database constraint
# does either (they have none: see their models).
EVENT_BATCH_SQL = f"""
WITH doomed AS ({EVENT_OLD} ORDER BY e.received_at LIMIT %(batch)s FOR UPDATE OF e SKIP LOCKED),
attempts AS (DELETE FROM {ATTEMPT} WHERE event_id IN (SELECT id FROM doomed) RETURNING 1),
logs AS (UPDATE {TXLOG} SET event_id = NULL WHERE event_id IN (SELECT id FROM doomed)),
gone AS (DELETE FROM {EVENT} WHERE id IN (SELECT id FROM doomed) RETURNING id)
SELECT (SELECT count(*) FROM gone), (SELECT max(received_at) FROM doomed),
       (SELECT count(*) FROM attempts)"""

# --dry-run: what the batches would delete.
TXLOG_COUNT_SQL = f"SELECT count(*), 0 FROM ({TXLOG_OLD}) old"
EVENT_COUNT_SQL = f"""
WITH old AS ({EVENT_OLD})
SELECT (SELECT count(*) FROM old),
       (SELECT count(*) FROM {ATTEMPT} WHERE event_id IN (SELECT id FROM old))"""


@dataclass(frozen=True)
class Table:
    """One kind of row pruned: its SQL and setting."""

    name: str
    batch_sql: str
    count_sql: str


TXLOGS = Table("transaction_logs", TXLOG_BATCH_SQL, TXLOG_COUNT_SQL)
EVENTS = Table("events", EVENT_BATCH_SQL, EVENT_COUNT_SQL)


@dataclass
class PruneResult:
    """What a run deleted (or, dry, would delete); a job's ``Result``."""

    dry_run: bool = False
    deleted: dict[str, int] = field(default_factory=lambda: {
        "transaction_logs": 0, "events": 0, "attempts": 0})
    batches: int = 0
    cutoffs: dict[str, str] = field(default_factory=dict)  # per table; absent: kept

    def counts(self) -> dict[str, int]:
        return {**self.deleted, "batches": self.batches}

    def findings(self) -> list[dict[str, Any]]:
        return [{"table": name, "older_than": cutoff, "dry_run": self.dry_run}
                for name, cutoff in self.cutoffs.items()]

    def problems(self) -> str:
        return ""

    def status(self) -> str:
        return "ok"


def _fetch(sql: str, params: dict[str, Any]) -> tuple[Any, ...]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    assert row is not None
    return tuple(row)


def _prune_table(table: Table, cutoff: datetime, result: PruneResult, *, batch: int,
                 dry_run: bool, tick: Tick) -> None:
    params: dict[str, Any] = {"cutoff": cutoff, "after": EPOCH, "batch": batch,
                              "settled": SETTLED, "active": ACTIVE_BULK}
    result.cutoffs[table.name] = cutoff.isoformat(timespec="seconds")
    if dry_run:
        rows, attempts = _fetch(table.count_sql, params)
        result.deleted[table.name] += rows
        result.deleted["attempts"] += attempts
        log.info("prune.would_delete", table=table.name, older_than=cutoff.isoformat(),
                 rows=rows, attempts=attempts)
        return
    while True:
        started = time.monotonic()
        with transaction.atomic():  # one short transaction per batch
            rows, reached, attempts = _fetch(table.batch_sql, params)
        # Rest as long as the batch took: deliveries get the database (and its WAL) at
        # least half the time, and a daily prune may take twice as long.
        time.sleep((time.monotonic() - started) * PAUSE_RATIO)
        result.batches += 1
        result.deleted[table.name] += rows
        result.deleted["attempts"] += attempts
        log.info("prune.batch", table=table.name, deleted=rows, attempts=attempts,
                 through=reached.isoformat() if reached else None)
        tick(f"{table.name}: {result.deleted[table.name]} deleted")
        if rows < batch:  # nothing old is left (but locked rows: next run)
            return
        params["after"] = reached


def prune(*, dry_run: bool = False, batch: int = BATCH_ROWS, tick: Tick = quiet,
          result: PruneResult | None = None, now: datetime | None = None) -> PruneResult:
    """Delete (or, ``dry_run``, count) what the retention settings let go.

    ``tick`` is called after every batch: a scheduled job stops there when its lease is
    lost or its worker stops (what was deleted stays deleted; the next run goes on)."""
    if batch < 1:
        raise ValueError(f"the batch size must be at least 1, not {batch}")
    result = result if result is not None else PruneResult()
    result.dry_run = dry_run
    now = now or timezone.now()
    _prune_table(TXLOGS, now - timedelta(days=settings.RETENTION_TXLOG_DAYS), result,
                 batch=batch, dry_run=dry_run, tick=tick)
    if settings.RETENTION_EVENT_DAYS is not None:
        _prune_table(EVENTS, now - timedelta(days=settings.RETENTION_EVENT_DAYS), result,
                     batch=batch, dry_run=dry_run, tick=tick)
    log.info("prune.finished", dry_run=dry_run, batches=result.batches, **result.deleted)
    return result
