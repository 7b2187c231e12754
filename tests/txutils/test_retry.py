"""Whole-transaction retries, provoked by real serialization failures and deadlocks."""

import psycopg2
import pytest
from django.db import IntegrityError, connection, transaction

import txutils
from tests.dbsessions import wait_blocked
from tests.txutils.conftest import write_skew_partner
from txutils import Outcome

pytestmark = pytest.mark.django_db(transaction=True)


def value_of(row_id: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT value FROM test WHERE id = %s", [row_id])
        return cursor.fetchone()[0]


def test_write_skew_is_aborted_with_40001_then_retried_whole(kv_table, session, records):
    calls = []
    committed = []

    @txutils.retry_on_deadlock(max_retries=3, delay=0.01)
    def withdraw_from_row_1() -> int:
        calls.append(1)
        with txutils.atomic_with_isolation("serializable"):
            with connection.cursor() as cursor:
                cursor.execute("SELECT sum(value) FROM test")
                (total,) = cursor.fetchone()
                if len(calls) == 1:
                    write_skew_partner(session)
                cursor.execute("UPDATE test SET value = value - 5 WHERE id = 1")
            transaction.on_commit(lambda: committed.append(len(calls)))
            return total

    total = withdraw_from_row_1()

    assert len(calls) == 2
    assert total == 25  # the retry saw the partner's committed write
    assert value_of(1) == 5 and value_of(2) == 15
    assert committed == [2]  # on_commit ran once, for the attempt that committed
    [record] = [r for r in records if r.operation.endswith("withdraw_from_row_1")]
    assert record.attempts == 2
    assert record.sqlstates == ["40001"]
    assert record.outcome is Outcome.COMMITTED
    assert record.isolation_level == "serializable"


def test_real_deadlock_is_detected_40p01_then_retried(kv_table, session, records):
    other = session("read committed", name="other")
    other.run("SET LOCAL deadlock_timeout = '30s'")  # so this test's function is the victim
    attempts = []
    blocked = []

    @txutils.retry_on_deadlock(max_retries=3, delay=0.01)
    def move_row_1_then_row_2() -> None:
        attempts.append(1)
        if len(attempts) == 2:
            # The victim's locks are gone: the other session finishes first.
            blocked[0].result(timeout=10)
            other.commit()
        with txutils.atomic_with_isolation("read committed"), connection.cursor() as cursor:
            cursor.execute("SET LOCAL deadlock_timeout = '50ms'")
            cursor.execute("UPDATE test SET value = value + 1 WHERE id = 1")
            if len(attempts) == 1:
                other.run("UPDATE test SET value = value * 10 WHERE id = 2")
                blocked.append(other.submit("UPDATE test SET value = value * 10 WHERE id = 1"))
                wait_blocked(other)
            cursor.execute("UPDATE test SET value = value + 1 WHERE id = 2")

    move_row_1_then_row_2()

    assert len(attempts) == 2
    # other: (10*10, 20*10) committed first, then ours: +1 each.
    assert (value_of(1), value_of(2)) == (101, 201)
    [record] = [r for r in records if r.operation.endswith("move_row_1_then_row_2")]
    assert record.sqlstates == ["40P01"]
    assert record.attempts == 2
    assert record.outcome is Outcome.COMMITTED


def test_exhaustion_after_exactly_max_retries_plus_one_attempts(kv_table, session, records):
    attempts = []

    @txutils.retry_on_deadlock(max_retries=2, delay=0.02, backoff=3.0, max_delay=0.05)
    def always_skewed() -> None:
        attempts.append(1)
        with txutils.atomic_with_isolation("serializable"), connection.cursor() as cursor:
            cursor.execute("SELECT sum(value) FROM test")
            write_skew_partner(session, name=f"partner{len(attempts)}")
            cursor.execute("UPDATE test SET value = value - 5 WHERE id = 1")

    with pytest.raises(txutils.TransactionError) as failure:
        always_skewed()

    assert len(attempts) == 3
    error = failure.value
    assert not isinstance(error, txutils.DeadlockError)
    assert error.sqlstate == "40001" and error.attempts == 3
    # Chained to Django's wrapper, itself chained to the driver's error.
    assert isinstance(error.__cause__.__cause__, psycopg2.errors.SerializationFailure)
    [record] = [r for r in records if r.operation.endswith("always_skewed")]
    assert record.outcome is Outcome.RETRIES_EXHAUSTED
    assert record.sqlstates == ["40001"] * 3
    # Full jitter: the n-th pause lies in [0, min(max_delay, delay * backoff**n)].
    bounds = [min(0.05, 0.02 * 3.0**n) for n in range(2)]
    assert len(record.retry_delays) == 2
    for pause, bound in zip(record.retry_delays, bounds, strict=True):
        assert 0 <= pause <= bound
    assert value_of(1) == 10  # none of the attempts wrote anything


def test_exhausted_deadlocks_raise_deadlock_error_chained_to_the_driver_error(kv_table, session):
    attempts = []

    @txutils.retry_on_deadlock(max_retries=0)
    def deadlocks() -> None:
        attempts.append(1)
        other = session("read committed", name="other")
        other.run("SET LOCAL deadlock_timeout = '30s'")
        with txutils.atomic_with_isolation("read committed"), connection.cursor() as cursor:
            cursor.execute("SET LOCAL deadlock_timeout = '50ms'")
            cursor.execute("UPDATE test SET value = 1 WHERE id = 1")
            other.run("UPDATE test SET value = 2 WHERE id = 2")
            other.submit("UPDATE test SET value = 2 WHERE id = 1")
            wait_blocked(other)
            cursor.execute("UPDATE test SET value = 1 WHERE id = 2")

    with pytest.raises(txutils.DeadlockError) as failure:
        deadlocks()
    assert len(attempts) == 1
    assert failure.value.sqlstate == "40P01"
    assert failure.value.attempts == 1
    assert getattr(failure.value.__cause__.__cause__, "pgcode", None) == "40P01"


def test_other_errors_are_not_retried(kv_table, records):
    attempts = []

    @txutils.retry_on_deadlock(max_retries=3, delay=0.01)
    def duplicate_key() -> None:
        attempts.append(1)
        with txutils.atomic_with_isolation("serializable"), connection.cursor() as cursor:
            cursor.execute("INSERT INTO test (id, value) VALUES (1, 0)")

    with pytest.raises(IntegrityError):
        duplicate_key()
    assert len(attempts) == 1
    [record] = [r for r in records if r.operation.endswith("duplicate_key")]
    assert record.outcome is Outcome.ROLLED_BACK
    assert record.sqlstates == ["23505"]


def test_nested_retry_defers_to_the_outermost_boundary(kv_table, session, records):
    """The seed's pattern: a retrying function inside a @financial_transaction."""
    inner_calls = []
    outer_calls = []

    @txutils.retry_on_deadlock(max_retries=3, delay=0.01)
    def inner_update() -> None:
        inner_calls.append(1)
        with txutils.atomic_with_isolation("serializable"):  # joins the outer transaction
            with connection.cursor() as cursor:
                cursor.execute("SELECT sum(value) FROM test")
                if len(inner_calls) == 1:
                    write_skew_partner(session)
                cursor.execute("UPDATE test SET value = value - 5 WHERE id = 1")

    @txutils.financial_transaction
    def webhook_update() -> str:
        outer_calls.append(1)
        inner_update()
        return txutils.get_current_isolation_level()

    assert webhook_update() == "serializable"
    assert len(outer_calls) == 2 and len(inner_calls) == 2
    mine = [r for r in records if "partner" not in r.operation]
    assert len(mine) == 1  # one record for the one outermost transaction
    assert mine[0].attempts == 2 and mine[0].sqlstates == ["40001"]
    assert value_of(1) == 5


def test_a_retrying_function_inside_an_open_transaction_runs_once_and_raises(kv_table, session):
    attempts = []

    @txutils.retry_on_deadlock(max_retries=5, delay=0.01)
    def skewed() -> None:
        attempts.append(1)
        with connection.cursor() as cursor:
            cursor.execute("SELECT sum(value) FROM test")
            write_skew_partner(session)
            cursor.execute("UPDATE test SET value = value - 5 WHERE id = 1")

    with pytest.raises(Exception) as failure, txutils.atomic_with_isolation("serializable"):
        skewed()
    assert txutils.sqlstate_of(failure.value) == "40001"
    assert len(attempts) == 1


def test_bare_decorator_forms():
    @txutils.financial_transaction
    def plain() -> int:
        return 1

    @txutils.financial_transaction(max_retries=1, operation="named")
    def named() -> int:
        return 2

    assert plain.__name__ == "plain" and named.__name__ == "named"


@pytest.mark.parametrize(
    "kwargs", [{"max_retries": -1}, {"delay": -0.1}, {"backoff": 0.5}, {"max_delay": -1}]
)
def test_nonsense_retry_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        txutils.retry_on_deadlock(**kwargs)
