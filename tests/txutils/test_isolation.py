"""Isolation levels: set first in the outermost transaction, never silently weakened."""

import pytest
import structlog
from django.db import IntegrityError, connection, transaction

import txutils
from tests.txutils.conftest import write_skew_partner
from txutils import IsolationLevel, Outcome

pytestmark = pytest.mark.django_db(transaction=True)

LEVELS = ["read committed", "repeatable read", "serializable"]


def row_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM test")
        return cursor.fetchone()[0]


@pytest.mark.parametrize("level", LEVELS)
def test_the_database_reports_the_level_that_was_asked_for(level, records):
    with txutils.atomic_with_isolation(level.upper().replace(" ", "_")):
        assert txutils.get_current_isolation_level() == level
    assert records[-1].isolation_level == level


def test_read_uncommitted_is_accepted_and_reported_as_postgresql_spells_it():
    with txutils.atomic_with_isolation("read uncommitted"):
        assert txutils.get_current_isolation_level() == "read uncommitted"


def test_outside_a_transaction_the_default_level_is_reported():
    assert not connection.in_atomic_block
    assert txutils.get_current_isolation_level() == "read committed"


def test_an_unknown_level_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="serializable"):
        with txutils.atomic_with_isolation("snapshot"):
            pass


@pytest.mark.parametrize(
    ("outer", "inner"),
    [("read committed", "repeatable read"), ("read committed", "serializable"),
     ("repeatable read", "serializable")],
)
def test_a_stronger_level_inside_a_weaker_transaction_is_refused(outer, inner):
    with txutils.atomic_with_isolation(outer):
        with pytest.raises(txutils.TransactionError, match=f"asked for {inner}"):
            with txutils.atomic_with_isolation(inner):
                pass
        assert txutils.get_current_isolation_level() == outer


def test_a_stronger_level_inside_a_plain_django_transaction_is_refused():
    with transaction.atomic(), pytest.raises(txutils.TransactionError):
        with txutils.atomic_with_isolation("serializable"):
            pass


@pytest.mark.parametrize(
    ("outer", "inner"),
    [("serializable", "serializable"), ("serializable", "read committed"),
     ("repeatable read", "read committed"), ("read committed", "read uncommitted")],
)
def test_the_same_or_a_weaker_level_joins_the_outer_transaction(outer, inner, kv_table, records):
    with txutils.atomic_with_isolation(outer), txutils.atomic_with_isolation(inner):
        assert txutils.get_current_isolation_level() == outer
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO test VALUES (3, 30)")
    assert row_count() == 3
    assert len(records) == 1  # the nested block is part of the one outermost transaction


def test_a_failing_nested_block_rolls_back_to_its_savepoint_only(kv_table):
    with txutils.atomic_with_isolation("serializable"):
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO test VALUES (3, 30)")
        with pytest.raises(IntegrityError), txutils.atomic_with_isolation("serializable"):
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO test VALUES (1, 0)")
    assert row_count() == 3


def test_read_only_transactions_refuse_writes_with_25006(kv_table, records):
    with pytest.raises(Exception) as failure:
        with txutils.atomic_with_isolation("serializable", read_only=True, deferrable=True):
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM test")
                cursor.execute("UPDATE test SET value = 0")
    assert txutils.sqlstate_of(failure.value) == "25006"
    assert records[-1].read_only is True
    assert records[-1].outcome is Outcome.ROLLED_BACK
    assert records[-1].sqlstates == ["25006"]


def test_deferrable_only_with_read_only_serializable():
    with pytest.raises(ValueError, match="DEFERRABLE"):
        with txutils.atomic_with_isolation("repeatable read", read_only=True, deferrable=True):
            pass


def test_usable_as_decorator_with_a_fresh_transaction_per_call(kv_table, records):
    @txutils.atomic_with_isolation("repeatable read", operation="report")
    def level() -> str:
        return txutils.get_current_isolation_level()

    assert [level(), level()] == ["repeatable read", "repeatable read"]
    assert [r.operation for r in records] == ["report", "report"]


def test_serializable_transaction_as_decorator_and_context_manager(records):
    @txutils.serializable_transaction
    def decorated() -> str:
        return txutils.get_current_isolation_level()

    assert decorated() == "serializable"
    with txutils.serializable_transaction(operation="cm"):
        assert txutils.get_current_isolation_level() == "serializable"
    assert records[-1].operation == "cm"


def test_isolation_levels_compare_as_postgresql_runs_them():
    read_uncommitted = IsolationLevel.parse("READ_UNCOMMITTED")
    assert read_uncommitted.strength == IsolationLevel.READ_COMMITTED.strength
    assert IsolationLevel.SERIALIZABLE.strength > IsolationLevel.REPEATABLE_READ.strength


# --- rollback_safe_operation -------------------------------------------------------


def test_rollback_safe_operation_undoes_only_its_own_writes_when_suppressing(kv_table):
    with txutils.atomic_with_isolation("serializable"):
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO test VALUES (3, 30)")
        with txutils.rollback_safe_operation("optional insert", suppress=(IntegrityError,)):
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO test VALUES (4, 40)")
                cursor.execute("INSERT INTO test VALUES (1, 0)")
    assert row_count() == 3


def test_rollback_safe_operation_reraises_and_logs_by_default(kv_table):
    with structlog.testing.capture_logs() as logs, pytest.raises(IntegrityError):
        with txutils.atomic_with_isolation("serializable"):
            with txutils.rollback_safe_operation("duplicate"):
                with connection.cursor() as cursor:
                    cursor.execute("INSERT INTO test VALUES (1, 0)")
    [event] = [e for e in logs if e["event"] == "tx.operation_rolled_back"]
    assert event["operation"] == "duplicate" and event["sqlstate"] == "23505"


def test_rollback_safe_operation_never_swallows_a_serialization_failure(kv_table, session):
    with pytest.raises(Exception) as failure, txutils.atomic_with_isolation("serializable"):
        with connection.cursor() as cursor:
            cursor.execute("SELECT sum(value) FROM test")
        write_skew_partner(session)
        with txutils.rollback_safe_operation("skewed", suppress=(Exception,)):
            with connection.cursor() as cursor:
                cursor.execute("UPDATE test SET value = value - 5 WHERE id = 1")
        pytest.fail("the transaction went on after a serialization failure")
    assert txutils.sqlstate_of(failure.value) == "40001"


def test_rollback_safe_operation_outside_a_transaction_is_refused():
    with pytest.raises(txutils.TransactionError, match="inside a transaction"):
        with txutils.rollback_safe_operation("orphan"):
            pass


def test_the_level_in_force_is_never_taken_from_a_transaction_that_ended():
    """Inside one retrying run: a txutils transaction, then a plain one at read committed."""

    @txutils.retry_on_deadlock(max_retries=0)
    def two_transactions() -> None:
        with txutils.atomic_with_isolation("serializable"):
            pass
        with transaction.atomic():
            with pytest.raises(txutils.TransactionError, match="read committed"):
                with txutils.atomic_with_isolation("serializable"):
                    pass

    two_transactions()
