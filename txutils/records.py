"""One record per outermost transaction, and the sinks that receive it.

A record is delivered after its transaction has ended, committed or rolled
back, so a sink may write to the database (in autocommit) without becoming part
of the transaction it describes. A sink added with ``before_commit=True`` is
instead called inside the outermost transaction, just before its commit, with
the record as it will be if the commit succeeds: what it writes then costs no
commit of its own. If that transaction does not commit (an error, a failed
commit; after a retry, the attempt that commits writes it), or is READ ONLY, or
runs on another database than the default one (where the sinks write), or has
been marked for rollback, the sink is called after it ended, like the others,
with the final record. A run that commits several transactions one after the
other is written once, by the first. The structlog sink is always on; the
console adds one that stores ``TransactionLog`` rows before commit.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any

import structlog

log = structlog.get_logger("txutils")


class Outcome(StrEnum):
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"  # an error that is not retried, or retrying was not allowed
    RETRIES_EXHAUSTED = "retries_exhausted"


Sink = Callable[["TransactionRecord"], None]


@dataclasses.dataclass
class TransactionRecord:
    operation: str
    started_at: datetime
    isolation_level: str | None = None  # as reported by the database inside the transaction
    read_only: bool = False
    attempts: int = 1
    sqlstates: list[str] = dataclasses.field(default_factory=list)
    retry_delays: list[float] = dataclasses.field(default_factory=list)  # seconds slept
    duration_ms: float = 0.0
    outcome: Outcome = Outcome.COMMITTED
    error: str | None = None
    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Bookkeeping, not part of the record: the clock the durations are measured on, and
    # the before-commit sinks that wrote the record in a transaction that committed.
    started_clock: float = dataclasses.field(default=0.0, metadata={"internal": True})
    written_by: list[Sink] = dataclasses.field(default_factory=list,
                                               metadata={"internal": True})

    def as_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if not field.metadata.get("internal")}


_sinks: list[Sink] = []
_before_commit_sinks: list[Sink] = []
_sinks_lock = threading.Lock()


def add_sink(sink: Sink, *, before_commit: bool = False) -> None:
    """Deliver every future record to ``sink`` too (idempotent); ``before_commit``: see
    the module docstring."""
    with _sinks_lock:
        _discard(sink)
        (_before_commit_sinks if before_commit else _sinks).append(sink)


def remove_sink(sink: Sink) -> None:
    with _sinks_lock:
        _discard(sink)


def _discard(sink: Sink) -> None:
    for group in (_sinks, _before_commit_sinks):
        if sink in group:
            group.remove(sink)


def structlog_sink(record: TransactionRecord) -> None:
    fields = record.as_dict()
    fields["started_at"] = record.started_at.isoformat()
    if record.outcome is Outcome.COMMITTED and record.attempts == 1:
        log.info("tx.completed", **fields)
    else:
        log.warning("tx.completed", **fields)


def write_before_commit(record: TransactionRecord) -> list[Sink]:
    """Inside the outermost transaction, its work done: hand the record, as it will be
    if the commit succeeds, to the before-commit sinks; return those that wrote it. A
    database error is raised (the transaction is aborted and must not look committed);
    any other failure is logged, and that sink gets the record after the transaction.
    A sink should fail, if it must, before it writes."""
    from django.db import DatabaseError

    with _sinks_lock:
        sinks = [sink for sink in _before_commit_sinks if sink not in record.written_by]
    wrote = []
    for sink in sinks:
        try:
            sink(record)
        except DatabaseError:
            raise
        except Exception:
            _log_sink_failure(sink, record)
        else:
            wrote.append(sink)
    return wrote


def emit(record: TransactionRecord) -> None:
    """After the transaction: hand ``record`` to every sink but the before-commit ones
    that wrote it in a transaction that committed; a failing sink is logged, never
    raised."""
    with _sinks_lock:
        sinks = [structlog_sink, *_sinks,
                 *(sink for sink in _before_commit_sinks if sink not in record.written_by)]
    for sink in sinks:
        try:
            sink(record)
        except Exception:
            _log_sink_failure(sink, record)


def _log_sink_failure(sink: Sink, record: TransactionRecord) -> None:
    log.exception("tx.sink_failed", sink=getattr(sink, "__qualname__", repr(sink)),
                  operation=record.operation)
