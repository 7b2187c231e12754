"""Real concurrent database sessions for tests, driven step by step.

Each ``Session`` is a thread with its own Django connection (so its own
PostgreSQL backend) holding one transaction opened by
``txutils.atomic_with_isolation``. The test submits statements to it one at a
time; a statement that blocks on a lock stays pending, and ``wait_blocked``
asks ``pg_stat_activity`` (not a timer) whether it is really waiting.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from django.db import connection, connections

from txutils import atomic_with_isolation, get_current_isolation_level

STEP_TIMEOUT_S = 20

_COMMIT = object()
_ROLLBACK = object()


class _Rollback(Exception):
    pass


class Session:
    """One transaction at ``level`` in its own thread and connection."""

    def __init__(self, level: str, *, read_only: bool = False, name: str = "session") -> None:
        self.level = level
        self.read_only = read_only
        self.name = name
        self.pid: int | None = None
        self.isolation_in_force: str | None = None
        self._inbox: queue.Queue[tuple[Any, Future[Any]]] = queue.Queue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.result(timeout=STEP_TIMEOUT_S)

    # --- driving ------------------------------------------------------------

    def submit(self, sql: str, params: Any = None) -> Future[Any]:
        """Send a statement; the future gives rows (or rowcount) or the error."""
        future: Future[Any] = Future()
        self._inbox.put(((sql, params), future))
        return future

    def run(self, sql: str, params: Any = None) -> Any:
        """Send a statement and wait for its result (raises its error)."""
        return self.submit(sql, params).result(timeout=STEP_TIMEOUT_S)

    def commit_async(self) -> Future[None]:
        future: Future[None] = Future()
        self._inbox.put((_COMMIT, future))
        return future

    def commit(self) -> None:
        self.commit_async().result(timeout=STEP_TIMEOUT_S)

    def rollback(self) -> None:
        future: Future[None] = Future()
        self._inbox.put((_ROLLBACK, future))
        future.result(timeout=STEP_TIMEOUT_S)

    def close(self) -> None:
        """Roll back if still open and stop the thread."""
        if self._thread.is_alive():
            self._inbox.put((_ROLLBACK, Future()))
        self._thread.join(timeout=STEP_TIMEOUT_S)

    # --- the thread ---------------------------------------------------------

    def _main(self) -> None:
        end: Future[None] | None = None
        try:
            with atomic_with_isolation(self.level, read_only=self.read_only,
                                       operation=f"test.{self.name}"):
                # SHOW takes no snapshot: it starts at the test's first statement.
                self.isolation_in_force = get_current_isolation_level()
                self.pid = _backend_pid()
                self._ready.set_result(None)
                end = self._serve()
            if end is not None:
                end.set_result(None)
        except _Rollback:
            if end is not None:
                end.set_result(None)
        except BaseException as exc:  # reported to whoever waits, never lost
            if not self._ready.done():
                self._ready.set_exception(exc)
            elif end is not None and not end.done():
                end.set_exception(exc)
        finally:
            connections.close_all()

    def _serve(self) -> Future[None] | None:
        """Run statements until commit; an error or rollback leaves by exception."""
        while True:
            command, future = self._inbox.get()
            if command is _COMMIT:
                return future
            if command is _ROLLBACK:
                future.set_result(None)
                raise _Rollback
            sql, params = command
            try:
                with connection.cursor() as cursor:
                    cursor.execute(sql, params)
                    result = cursor.fetchall() if cursor.description else cursor.rowcount
            except BaseException as exc:
                future.set_exception(exc)
                raise _Rollback from exc  # the transaction is aborted; end it
            future.set_result(result)


def _backend_pid() -> int:
    """The server backend running this thread's open transaction, without taking a snapshot
    (so its first statement is still the test's): the backend names itself (SET, for this
    transaction only) and another connection looks the name up. Not the connection's own
    backend pid: behind PgBouncer in transaction pooling (TEST_PGBOUNCER=1) that is
    PgBouncer's, and each transaction may run on another server backend."""
    name = f"dbsession-{uuid.uuid4().hex}"
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL application_name = %s", [name])
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [name])
            row = cursor.fetchone()
    finally:
        other.close()
    assert row is not None, "the session's backend is not in pg_stat_activity"
    return int(row[0])


def backend_waiting_on_lock(pid: int) -> bool:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row is not None and row[0] == "Lock"


def wait_blocked(session: Session, timeout: float = STEP_TIMEOUT_S) -> None:
    """Return once ``session``'s backend waits on a lock; fail after ``timeout``."""
    assert session.pid is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend_waiting_on_lock(session.pid):
            return
        time.sleep(0.01)
    raise AssertionError(f"{session.name} (pid {session.pid}) never waited on a lock")
