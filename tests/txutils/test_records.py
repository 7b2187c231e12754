"""One record per outermost transaction, delivered after it ended."""

import pytest
import structlog
from django.db import connection

import txutils
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

    txutils.add_sink(sink)
    try:
        with txutils.atomic_with_isolation("repeatable read", operation="outer"):
            pass
    finally:
        txutils.remove_sink(sink)
    assert states == [("outer", False)]


def test_a_failing_sink_is_logged_and_does_not_break_the_caller(records):
    def broken(record: txutils.TransactionRecord) -> None:
        raise RuntimeError("sink down")

    txutils.add_sink(broken)
    try:
        with structlog.testing.capture_logs() as logs:
            with txutils.atomic_with_isolation("serializable", operation="survives"):
                pass
    finally:
        txutils.remove_sink(broken)
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
