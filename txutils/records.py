"""One record per outermost transaction, and the sinks that receive it.

A record is delivered after its transaction has ended, committed or rolled
back, so a sink may write to the database (in autocommit) without becoming part
of the transaction it describes. The structlog sink is always on; the console
adds one that stores ``TransactionLog`` rows.
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

    def as_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


Sink = Callable[[TransactionRecord], None]

_sinks: list[Sink] = []
_sinks_lock = threading.Lock()


def add_sink(sink: Sink) -> None:
    """Deliver every future record to ``sink`` too (idempotent)."""
    with _sinks_lock:
        if sink not in _sinks:
            _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    with _sinks_lock:
        if sink in _sinks:
            _sinks.remove(sink)


def structlog_sink(record: TransactionRecord) -> None:
    fields = record.as_dict()
    fields["started_at"] = record.started_at.isoformat()
    if record.outcome is Outcome.COMMITTED and record.attempts == 1:
        log.info("tx.completed", **fields)
    else:
        log.warning("tx.completed", **fields)


def emit(record: TransactionRecord) -> None:
    """Hand ``record`` to every sink; a failing sink is logged, never raised."""
    with _sinks_lock:
        sinks = [structlog_sink, *_sinks]
    for sink in sinks:
        try:
            sink(record)
        except Exception:
            log.exception("tx.sink_failed", sink=getattr(sink, "__qualname__", repr(sink)),
                          operation=record.operation)
