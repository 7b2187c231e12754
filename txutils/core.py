"""Transactions with an explicit isolation level, retried whole on 40001/40P01.

Rules (docs/design.md, section 7):

* ``SET TRANSACTION ISOLATION LEVEL`` is the first statement of the outermost
  transaction; PostgreSQL ignores (or rejects) it anywhere else. A nested block
  joins the outer transaction through a savepoint when it asks for the level in
  force or a weaker one, and raises ``TransactionError`` when it asks for more.
* Only the outermost boundary retries, and it re-runs the whole transaction:
  after a serialization failure or a deadlock the transaction is aborted and
  nothing inside it can be saved. A retrying function called inside an open
  transaction (or inside another retrying function) runs once and lets the
  error rise to that outer boundary.
* Each outermost transaction, with all its attempts, produces one
  ``TransactionRecord`` (see records.py), delivered after it has ended, or, to a
  before-commit sink, inside it just before its commit.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar, overload

import structlog
from django.db import DEFAULT_DB_ALIAS, transaction

from txutils.records import Outcome, TransactionRecord, emit, write_before_commit

log = structlog.get_logger("txutils")

P = ParamSpec("P")
R = TypeVar("R")

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, DEADLOCK_DETECTED})


class TransactionError(Exception):
    """A transaction could not be completed as asked.

    ``sqlstate`` is the PostgreSQL error code behind it, when there is one;
    ``attempts`` how many times the transaction was run.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None,
                 attempts: int | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.attempts = attempts


class DeadlockError(TransactionError):
    """Retries ran out and the last attempt ended in a deadlock (40P01)."""


class IsolationLevel(StrEnum):
    """PostgreSQL's own spelling, as ``SHOW transaction_isolation`` returns it."""

    READ_UNCOMMITTED = "read uncommitted"
    READ_COMMITTED = "read committed"
    REPEATABLE_READ = "repeatable read"
    SERIALIZABLE = "serializable"

    @classmethod
    def parse(cls, value: str) -> IsolationLevel:
        try:
            return cls(value.strip().lower().replace("_", " "))
        except ValueError:
            names = ", ".join(level.value for level in cls)
            raise ValueError(f"unknown isolation level {value!r}; use one of: {names}") from None

    @property
    def strength(self) -> int:
        # PostgreSQL runs READ UNCOMMITTED as READ COMMITTED.
        return {"read uncommitted": 0, "read committed": 0, "repeatable read": 1,
                "serializable": 2}[self.value]


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of the driver error behind ``exc`` (Django wraps it as the cause)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "pgcode", None) or getattr(current, "sqlstate", None)
        if isinstance(code, str):
            return code
        current = current.__cause__ or current.__context__
    return None


def get_current_isolation_level(using: str | None = None) -> str:
    """The isolation level in force, asked of the database: ``'serializable'``, ...

    Outside a transaction this is the level the next transaction would get.
    """
    with transaction.get_connection(using).cursor() as cursor:
        # SHOW, unlike SELECT, takes no snapshot: asking does not start the clock.
        cursor.execute("SHOW transaction_isolation")
        row = cursor.fetchone()
    assert row is not None
    return str(row[0])


# --- the run: what one outermost transaction did, over all its attempts -------

_current_run: ContextVar[TransactionRecord | None] = ContextVar("txutils_run", default=None)
_operation_name: ContextVar[str | None] = ContextVar("txutils_operation", default=None)
# The level the database reported for the outermost txutils transaction now open.
_level_in_force: ContextVar[str | None] = ContextVar("txutils_level", default=None)


def annotate(**fields: Any) -> None:
    """Attach fields (e.g. ``event_id=…``) to the record of the transaction in progress."""
    record = _current_run.get()
    if record is not None:
        record.context.update(fields)


@contextlib.contextmanager
def _outermost_run(operation: str | None, fallback: str) -> Iterator[TransactionRecord]:
    """Open the record of an outermost transaction; emit it once everything has ended."""
    record = TransactionRecord(operation=operation or _operation_name.get() or fallback,
                               started_at=datetime.now(UTC))
    token = _current_run.set(record)
    record.started_clock = time.perf_counter()
    try:
        yield record
    except BaseException as exc:
        if record.outcome is Outcome.COMMITTED:  # not already set by the retry loop
            record.outcome = Outcome.ROLLED_BACK
            code = sqlstate_of(exc)
            if code is not None:
                record.sqlstates.append(code)
        record.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        record.duration_ms = _elapsed_ms(record)
        _current_run.reset(token)
        emit(record)


def _elapsed_ms(record: TransactionRecord) -> float:
    return round((time.perf_counter() - record.started_clock) * 1000, 3)


def _inside_transaction_or_run(using: str | None) -> bool:
    return transaction.get_connection(using).in_atomic_block or _current_run.get() is not None


# --- isolation ------------------------------------------------------------------


@contextlib.contextmanager
def atomic_with_isolation(
    level: str | IsolationLevel,
    *,
    read_only: bool = False,
    deferrable: bool = False,
    using: str | None = None,
    operation: str | None = None,
) -> Iterator[None]:
    """A transaction at ``level``; usable as a context manager or a decorator.

    ``read_only`` and ``deferrable`` (with serializable) are for report queries:
    a deferrable read-only serializable transaction waits for a safe snapshot
    and then can neither fail with 40001 nor cause one.
    """
    wanted = IsolationLevel.parse(level) if isinstance(level, str) else level
    if deferrable and not (read_only and wanted is IsolationLevel.SERIALIZABLE):
        raise ValueError("DEFERRABLE only has an effect on READ ONLY SERIALIZABLE transactions")
    connection = transaction.get_connection(using)

    if connection.in_atomic_block:
        # Ours if txutils opened the outer transaction; otherwise ask the database.
        in_force = IsolationLevel.parse(_level_in_force.get() or get_current_isolation_level(using))
        if wanted.strength > in_force.strength:
            raise TransactionError(
                f"asked for {wanted.value} inside a transaction already running at "
                f"{in_force.value}; PostgreSQL fixes the level at the start of the outermost "
                "transaction, so open the outer transaction at the level you need"
            )
        with transaction.atomic(using=using):  # a savepoint in the outer transaction
            yield
        return

    clause = f"ISOLATION LEVEL {wanted.value.upper()}"
    if read_only:
        clause += " READ ONLY"
    if deferrable:
        clause += " DEFERRABLE"

    owner = _outermost_run(operation, "transaction") if _current_run.get() is None else None
    with owner or contextlib.nullcontext():
        record = _current_run.get()
        assert record is not None
        wrote = []
        with transaction.atomic(using=using):
            with connection.cursor() as cursor:
                # One round trip: set the level first, then read back what is in force.
                # SHOW takes no snapshot, so the snapshot still starts at the first query.
                cursor.execute(f"SET TRANSACTION {clause}; SHOW transaction_isolation")
                row = cursor.fetchone()
            record.isolation_level = str(row[0]) if row else None
            record.read_only = read_only
            level_token = _level_in_force.set(record.isolation_level)
            try:
                yield
            finally:
                _level_in_force.reset(level_token)
            # The work is done: the before-commit sinks write in this transaction (the
            # record's duration then stops short of the commit).
            if connection.needs_rollback:  # set_rollback(True): nothing will commit
                record.outcome = Outcome.ROLLED_BACK
            elif not read_only and connection.alias == DEFAULT_DB_ALIAS:
                record.duration_ms = _elapsed_ms(record)
                wrote = write_before_commit(record)
        record.written_by += wrote  # only once the commit succeeded


@overload
def serializable_transaction(func: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def serializable_transaction(
    func: None = None, /, *, read_only: bool = False, deferrable: bool = False,
    using: str | None = None, operation: str | None = None,
) -> contextlib.AbstractContextManager[None]: ...
def serializable_transaction(
    func: Callable[P, R] | None = None, /, *, read_only: bool = False, deferrable: bool = False,
    using: str | None = None, operation: str | None = None,
) -> Callable[P, R] | contextlib.AbstractContextManager[None]:
    """``@serializable_transaction`` or ``with serializable_transaction():`` (no retry)."""
    manager = atomic_with_isolation(IsolationLevel.SERIALIZABLE, read_only=read_only,
                                    deferrable=deferrable, using=using, operation=operation)
    if func is None:
        return manager
    return manager(func)


# --- retries --------------------------------------------------------------------


def retry_on_deadlock(
    max_retries: int = 3,
    delay: float = 0.1,
    backoff: float = 2.0,
    *,
    max_delay: float = 2.0,
    using: str | None = None,
    operation: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Re-run the decorated function when it fails with 40001 or 40P01.

    The function must open the outermost transaction itself (for example with
    ``atomic_with_isolation``) so that each attempt is a whole new transaction.
    Before attempt ``n`` (n >= 1) it sleeps a uniformly random time in
    ``[0, min(max_delay, delay * backoff ** (n - 1))]`` (full jitter), so
    clients that collided do not collide again in lockstep. After
    ``max_retries`` retries it raises ``DeadlockError`` (last failure 40P01) or
    ``TransactionError`` (40001), chained to the database error.
    """
    if max_retries < 0 or delay < 0 or backoff < 1 or max_delay < 0:
        raise ValueError("retry_on_deadlock needs max_retries >= 0, delay >= 0, backoff >= 1")

    def decorator(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if _inside_transaction_or_run(using):
                # Retrying here would re-run statements in an aborted transaction;
                # the error goes up to the outermost boundary, which retries it all.
                return func(*args, **kwargs)
            with _outermost_run(operation, func.__qualname__) as record:
                attempt = 0
                while True:
                    record.attempts = attempt + 1
                    try:
                        return func(*args, **kwargs)
                    except Exception as exc:
                        code = sqlstate_of(exc)
                        if code not in RETRYABLE_SQLSTATES:
                            raise
                        record.sqlstates.append(code)
                        if attempt >= max_retries:
                            record.outcome = Outcome.RETRIES_EXHAUSTED
                            error = DeadlockError if code == DEADLOCK_DETECTED else TransactionError
                            raise error(
                                f"{record.operation} failed after {attempt + 1} attempts "
                                f"(SQLSTATE {code})", sqlstate=code, attempts=attempt + 1,
                            ) from exc
                        pause = random.uniform(0, min(max_delay, delay * backoff**attempt))
                        record.retry_delays.append(pause)
                        log.warning("tx.retry", operation=record.operation, sqlstate=code,
                                    attempt=attempt + 1, sleep_s=round(pause, 4))
                        time.sleep(pause)
                        attempt += 1

        return wrapper

    return decorator


@overload
def financial_transaction(func: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def financial_transaction(
    func: None = None, /, *, max_retries: int = 3, delay: float = 0.1,
    operation: str | None = None, using: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
def financial_transaction(
    func: Callable[P, R] | None = None, /, *, max_retries: int = 3, delay: float = 0.1,
    operation: str | None = None, using: str | None = None,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """What money-moving code wants: SERIALIZABLE, retried whole on 40001/40P01
    (``delay``: the first back-off ceiling, see ``retry_on_deadlock``)."""

    def decorator(inner: Callable[P, R]) -> Callable[P, R]:
        name = operation or inner.__qualname__
        isolated = atomic_with_isolation(IsolationLevel.SERIALIZABLE, using=using,
                                         operation=name)(inner)
        return retry_on_deadlock(max_retries, delay, using=using, operation=name)(isolated)

    return decorator if func is None else decorator(func)


# --- operations inside a transaction ----------------------------------------------


@contextlib.contextmanager
def rollback_safe_operation(
    name: str,
    *,
    suppress: tuple[type[BaseException], ...] = (),
    using: str | None = None,
) -> Iterator[None]:
    """A named step inside a transaction, undone alone (savepoint) when it fails.

    The failure is logged and re-raised, unless it is one of ``suppress``; a
    serialization failure or deadlock is always re-raised, because the whole
    transaction must then be retried, not continued.
    """
    if not transaction.get_connection(using).in_atomic_block:
        raise TransactionError(f"rollback_safe_operation({name!r}) must run inside a transaction")
    try:
        with transaction.atomic(using=using):
            yield
    except Exception as exc:
        code = sqlstate_of(exc)
        log.warning("tx.operation_rolled_back", operation=name, sqlstate=code,
                    error=f"{type(exc).__name__}: {exc}")
        if code in RETRYABLE_SQLSTATES or not isinstance(exc, suppress):
            raise


@overload
def log_transaction_performance(func: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def log_transaction_performance(
    func: None = None, /, *, operation: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
def log_transaction_performance(
    func: Callable[P, R] | None = None, /, *, operation: str | None = None,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Name the transactions a function runs, and log its own duration and outcome."""

    def decorator(inner: Callable[P, R]) -> Callable[P, R]:
        name = operation or inner.__qualname__

        @functools.wraps(inner)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            token = _operation_name.set(name)
            started = time.perf_counter()
            outcome = "error"
            try:
                result = inner(*args, **kwargs)
                outcome = "ok"
                return result
            finally:
                _operation_name.reset(token)
                log.info("tx.performance", operation=name, outcome=outcome,
                         duration_ms=round((time.perf_counter() - started) * 1000, 3))

        return wrapper

    return decorator if func is None else decorator(func)
