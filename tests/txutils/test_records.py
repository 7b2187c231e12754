"""One record per outermost transaction, delivered after it ended (or, to a before-commit
sink, just before its commit)."""

from collections.abc import Iterator

import pytest
import structlog
from django.db import IntegrityError, ProgrammingError, connection, transaction

import txutils
from tests.txutils.conftest import sink_added, write_skew_partner
from txutils import Outcome

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_rolled_back_transaction_still_emits_its_record(records):
    with pytest.raises(ZeroDivisionError):
        with txutils.atomic_with_isolation("serializable", operation="divide"):
            txutils.annotate(payout_id="po_123")
            _ = 1 / 0
    [record] = records
    assert record.operation == "divide"
    assert record.outcome is Outcome.ROLLED_BACK
    assert record.error == "ZeroDivisionError: division by zero"
    assert record.isolation_level == "serializable"
    assert record.attempts == 1
    assert record.context == {"payout_id": "po_123"}
    assert record.duration_ms >= 0


def test_records_are_delivered_after_the_transaction_has_ended():
    states = []

    def sink(record: txutils.TransactionRecord) -> None:
        states.append((record.operation, connection.in_atomic_block))

    with sink_added(sink), txutils.atomic_with_isolation("repeatable read", operation="outer"):
        pass
    assert states == [("outer", False)]


def test_a_failing_sink_is_logged_and_does_not_break_the_caller(records):
    def broken(record: txutils.TransactionRecord) -> None:
        raise RuntimeError("sink down")

    with sink_added(broken), structlog.testing.capture_logs() as logs:
        with txutils.atomic_with_isolation("serializable", operation="survives"):
            pass
    assert [r.outcome for r in records] == [Outcome.COMMITTED]
    assert any(e["event"] == "tx.sink_failed" and e["operation"] == "survives" for e in logs)


def test_the_structlog_record_carries_every_field():
    with structlog.testing.capture_logs() as logs:
        with txutils.atomic_with_isolation("serializable", operation="logged"):
            pass
    [event] = [e for e in logs if e["event"] == "tx.completed"]
    assert event["operation"] == "logged"
    assert event["isolation_level"] == "serializable"
    assert event["attempts"] == 1
    assert event["sqlstates"] == []
    assert event["outcome"] == "committed"
    assert "duration_ms" in event and "started_at" in event


def test_log_transaction_performance_names_the_transactions_inside(records):
    @txutils.log_transaction_performance
    def settle_payout() -> None:
        with txutils.atomic_with_isolation("serializable"):
            pass

    with structlog.testing.capture_logs() as logs:
        settle_payout()
    assert records[-1].operation.endswith("settle_payout")
    [perf] = [e for e in logs if e["event"] == "tx.performance"]
    assert perf["outcome"] == "ok" and perf["operation"].endswith("settle_payout")


def test_log_transaction_performance_logs_failures_too():
    @txutils.log_transaction_performance(operation="fails")
    def fails() -> None:
        raise KeyError("x")

    with structlog.testing.capture_logs() as logs, pytest.raises(KeyError):
        fails()
    [perf] = [e for e in logs if e["event"] == "tx.performance"]
    assert perf == {**perf, "operation": "fails", "outcome": "error"}


def test_sqlstate_is_found_behind_wrappers():
    class Driver(Exception):
        pgcode = "40P01"

    try:
        try:
            raise Driver()
        except Driver as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert txutils.sqlstate_of(wrapped) == "40P01"
    assert txutils.sqlstate_of(ValueError()) is None


# --- sinks that write inside the transaction they describe -----------------------------


@pytest.fixture
def calls() -> Iterator[list[tuple[str, Outcome, int, bool, int | None]]]:
    """A before-commit sink's calls: (operation, outcome, attempts, inside a transaction,
    the transaction id it ran in, or None outside one)."""
    seen: list[tuple[str, Outcome, int, bool, int | None]] = []

    def sink(record: txutils.TransactionRecord) -> None:
        inside = connection.in_atomic_block
        seen.append((record.operation, record.outcome, record.attempts, inside,
                     current_xid() if inside else None))

    with sink_added(sink, before_commit=True):
        yield seen


def current_xid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT txid_current()")
        return int(cursor.fetchone()[0])


def test_a_before_commit_sink_writes_in_the_transaction_it_describes(calls, records):
    with txutils.atomic_with_isolation("serializable", operation="paid"):
        xid = current_xid()
        with txutils.atomic_with_isolation("serializable"):  # joins: a savepoint
            pass
    assert calls == [("paid", Outcome.COMMITTED, 1, True, xid)]  # once, and not again after
    assert len(records) == 1 and "written_by" not in records[0].as_dict()


def test_a_read_only_transaction_is_written_after(calls):
    with txutils.atomic_with_isolation("serializable", read_only=True, operation="report"):
        pass
    assert calls == [("report", Outcome.COMMITTED, 1, False, None)]


def test_a_transaction_marked_for_rollback_is_written_after_as_rolled_back(kv_table, calls):
    with txutils.atomic_with_isolation("serializable", operation="undone"):
        with connection.cursor() as cursor:
            cursor.execute("UPDATE test SET value = 0 WHERE id = 1")
        transaction.set_rollback(True)
    assert calls == [("undone", Outcome.ROLLED_BACK, 1, False, None)]


def test_a_failure_after_the_commit_does_not_write_the_record_twice(calls, records):
    @txutils.retry_on_deadlock(max_retries=1)
    def commit_then_fail() -> None:
        with txutils.atomic_with_isolation("serializable"):
            pass
        raise ValueError("after the commit")

    with pytest.raises(ValueError):
        commit_then_fail()
    assert [inside for *_, inside, _ in calls] == [True]


def test_a_run_of_two_transactions_is_written_once_by_the_first(calls):
    @txutils.retry_on_deadlock(max_retries=1)
    def twice() -> list[int]:
        xids = []
        for _ in range(2):
            with txutils.atomic_with_isolation("serializable"):
                xids.append(current_xid())
        return xids

    first, _second = twice()
    assert [(inside, xid) for *_, inside, xid in calls] == [(True, first)]


def test_a_before_commit_sink_sees_the_retries_of_the_attempt_that_commits(
        kv_table, session, calls):
    attempts = []

    @txutils.retry_on_deadlock(max_retries=3, delay=0.01)
    def withdraw() -> None:
        attempts.append(1)
        with txutils.atomic_with_isolation("serializable"):
            with connection.cursor() as cursor:
                cursor.execute("SELECT sum(value) FROM test")
                if len(attempts) == 1:
                    write_skew_partner(session)
                cursor.execute("UPDATE test SET value = value - 5 WHERE id = 1")

    withdraw()
    assert [(outcome, n, inside) for op, outcome, n, inside, _ in calls
            if op.endswith("withdraw")] == [(Outcome.COMMITTED, 2, True)]


def test_when_the_commit_fails_the_sink_is_called_again_after(kv_table, calls, records):
    """A deferred constraint fails at COMMIT: what the sink wrote is rolled back with the
    transaction, and it gets the final record afterwards."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE test ADD CONSTRAINT once UNIQUE (value) "
                       "DEFERRABLE INITIALLY DEFERRED")
    with pytest.raises(IntegrityError):
        with txutils.atomic_with_isolation("serializable", operation="duplicate"):
            with connection.cursor() as cursor:
                cursor.execute("UPDATE test SET value = 20 WHERE id = 1")
    assert [(outcome, inside) for _, outcome, _, inside, _ in calls] == [
        (Outcome.COMMITTED, True), (Outcome.ROLLED_BACK, False)]
    assert records[-1].outcome is Outcome.ROLLED_BACK


def test_when_the_body_fails_the_sink_is_only_called_after(calls):
    with pytest.raises(ZeroDivisionError):
        with txutils.atomic_with_isolation("serializable", operation="divide"):
            _ = 1 / 0
    assert calls == [("divide", Outcome.ROLLED_BACK, 1, False, None)]


def test_a_before_commit_sink_that_fails_in_python_gets_the_record_after(calls):
    """The failure is logged; that sink alone is called again once the transaction has
    committed, the sinks that wrote inside it are not."""
    fussy_calls = []

    def fussy(record: txutils.TransactionRecord) -> None:
        fussy_calls.append(connection.in_atomic_block)
        if connection.in_atomic_block:
            raise ValueError("cannot serialise the context")

    with sink_added(fussy, before_commit=True), structlog.testing.capture_logs() as logs:
        with txutils.atomic_with_isolation("serializable", operation="kept"):
            pass
    assert fussy_calls == [True, False]
    assert [(outcome, inside) for _, outcome, _, inside, _ in calls] == [
        (Outcome.COMMITTED, True)]
    assert any(e["event"] == "tx.sink_failed" for e in logs)


def test_a_database_error_in_a_before_commit_sink_fails_the_transaction(kv_table, records):
    def broken(record: txutils.TransactionRecord) -> None:
        if connection.in_atomic_block:
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO no_such_table VALUES (1)")

    with sink_added(broken, before_commit=True), pytest.raises(ProgrammingError):
        with txutils.atomic_with_isolation("serializable", operation="not kept"):
            with connection.cursor() as cursor:
                cursor.execute("UPDATE test SET value = 0 WHERE id = 1")
    with connection.cursor() as cursor:
        cursor.execute("SELECT value FROM test WHERE id = 1")
        assert cursor.fetchone()[0] == 10  # nothing of it committed
    assert records[-1].outcome is Outcome.ROLLED_BACK
