"""Hermitage's isolation anomaly suite for PostgreSQL, run through ``atomic_with_isolation``.

After Martin Kleppmann's hermitage (postgres.md): each test replays one script
step by step with real concurrent sessions and asserts, per isolation level, the
values read, which statement blocks, which one fails with which SQLSTATE and at
which step, and what the table holds at the end. Together they show that the
level the project asks for is the level PostgreSQL enforces, not just its name.

Where hermitage documents only some levels, the others assert what PostgreSQL 18
really does (the same as the documented stronger or weaker level, except where a
comment says otherwise).
"""

from collections.abc import Callable
from typing import Any

import pytest
from django.db import DatabaseError, connection

from tests.dbsessions import Session, wait_blocked
from txutils import atomic_with_isolation, sqlstate_of

RC = "read committed"
RR = "repeatable read"
SER = "serializable"
LEVELS = [RC, RR, SER]

SERIALIZATION_FAILURE = "40001"
READ_ONLY_TRANSACTION = "25006"

levels = pytest.mark.parametrize("level", LEVELS)


def begin(session: Callable[..., Session], level: str, *names: str) -> list[Session]:
    """Open one session per name at ``level``, in order, checking the level in force."""
    opened = [session(level, name=name) for name in names]
    for each in opened:
        assert each.isolation_in_force == level
    return opened


def select(s: Session, sql: str) -> list[tuple[int, int]]:
    """Rows of a ``SELECT`` run in ``s``, sorted by id (hermitage's selects have no ORDER BY)."""
    return sorted(s.run(sql))


def table() -> list[tuple[int, int]]:
    """The committed content of ``test``, read outside every session."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, value FROM test ORDER BY id")
        return list(cursor.fetchall())


def fails_with(code: str, step: Callable[[], Any]) -> None:
    """``step`` raises a database error with SQLSTATE ``code``."""
    with pytest.raises(DatabaseError) as failure:
        step()
    assert sqlstate_of(failure.value) == code


def blocks(s: Session, sql: str) -> Any:
    """Submit ``sql`` to ``s`` and return its future once ``s`` really waits on a lock."""
    pending = s.submit(sql)
    wait_blocked(s)
    assert not pending.done()
    return pending


# --- Read Committed basic requirements (G0, G1a, G1b, G1c) -----------------------------------


@pytest.mark.django_db(transaction=True)
@levels
def test_g0_write_cycles(kv_table, session, level):
    """G0 (dirty write): a row written by an open transaction cannot be overwritten."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert t1.run("update test set value = 11 where id = 1") == 1
    pending = blocks(t2, "update test set value = 12 where id = 1")
    assert t1.run("update test set value = 21 where id = 2") == 1
    t1.commit()
    assert table() == [(1, 11), (2, 21)]
    if level == RC:
        assert pending.result(timeout=10) == 1
        assert t2.run("update test set value = 22 where id = 2") == 1
        t2.commit()
        assert table() == [(1, 12), (2, 22)]
    else:
        fails_with(SERIALIZATION_FAILURE, lambda: pending.result(timeout=10))
        assert table() == [(1, 11), (2, 21)]


@pytest.mark.django_db(transaction=True)
@levels
def test_g1a_aborted_reads(kv_table, session, level):
    """G1a (aborted read): a write of a transaction that rolls back is never seen."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert t1.run("update test set value = 101 where id = 1") == 1
    assert select(t2, "select * from test") == [(1, 10), (2, 20)]
    t1.rollback()
    assert select(t2, "select * from test") == [(1, 10), (2, 20)]
    t2.commit()
    assert table() == [(1, 10), (2, 20)]


@pytest.mark.django_db(transaction=True)
@levels
def test_g1b_intermediate_reads(kv_table, session, level):
    """G1b (intermediate read): only a transaction's final committed write is seen."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert t1.run("update test set value = 101 where id = 1") == 1
    assert select(t2, "select * from test") == [(1, 10), (2, 20)]
    assert t1.run("update test set value = 11 where id = 1") == 1
    t1.commit()
    # Read committed sees the final committed value; the snapshot levels keep the old one.
    seen = [(1, 11), (2, 20)] if level == RC else [(1, 10), (2, 20)]
    assert select(t2, "select * from test") == seen
    t2.commit()
    assert table() == [(1, 11), (2, 20)]


@pytest.mark.django_db(transaction=True)
@levels
def test_g1c_circular_information_flow(kv_table, session, level):
    """G1c (circular information flow): neither transaction sees the other's uncommitted write."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert t1.run("update test set value = 11 where id = 1") == 1
    assert t2.run("update test set value = 22 where id = 2") == 1
    assert select(t1, "select * from test where id = 2") == [(2, 20)]
    assert select(t2, "select * from test where id = 1") == [(1, 10)]
    t1.commit()
    if level == SER:
        # Not in hermitage (its G1c script is read committed only): each read the row the
        # other wrote, a write-skew cycle, so serializable fails the second commit.
        fails_with(SERIALIZATION_FAILURE, t2.commit)
        assert table() == [(1, 11), (2, 20)]
    else:
        t2.commit()
        assert table() == [(1, 11), (2, 22)]


# --- Observed Transaction Vanishes (OTV) ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@levels
def test_otv_observed_transaction_vanishes(kv_table, session, level):
    """OTV (observed transaction vanishes): a reader never sees a committed write disappear."""
    t1, t2, t3 = begin(session, level, "T1", "T2", "T3")
    assert t1.run("update test set value = 11 where id = 1") == 1
    assert t1.run("update test set value = 19 where id = 2") == 1
    pending = blocks(t2, "update test set value = 12 where id = 1")
    t1.commit()
    if level == RC:
        assert pending.result(timeout=10) == 1
        assert select(t3, "select * from test where id = 1") == [(1, 11)]
        assert t2.run("update test set value = 18 where id = 2") == 1
        assert select(t3, "select * from test where id = 2") == [(2, 19)]
        t2.commit()
        assert select(t3, "select * from test where id = 2") == [(2, 18)]
        assert select(t3, "select * from test where id = 1") == [(1, 12)]
        t3.commit()
        assert table() == [(1, 12), (2, 18)]
    else:
        fails_with(SERIALIZATION_FAILURE, lambda: pending.result(timeout=10))
        assert select(t3, "select * from test where id = 1") == [(1, 11)]
        assert select(t3, "select * from test where id = 2") == [(2, 19)]
        t3.commit()
        assert table() == [(1, 11), (2, 19)]


# --- Predicate-Many-Preceders (PMP) -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@levels
def test_pmp_predicate_many_preceders(kv_table, session, level):
    """PMP (predicate-many-preceders): a predicate read does not change within a transaction."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert select(t1, "select * from test where value = 30") == []
    assert t2.run("insert into test (id, value) values(3, 30)") == 1
    t2.commit()
    seen = [(3, 30)] if level == RC else []
    assert select(t1, "select * from test where value % 3 = 0") == seen
    t1.commit()
    assert table() == [(1, 10), (2, 20), (3, 30)]


@pytest.mark.django_db(transaction=True)
@levels
def test_pmp_write_predicates(kv_table, session, level):
    """PMP for write predicates: a delete's predicate is judged on one consistent state."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert t1.run("update test set value = value + 10") == 2
    pending = blocks(t2, "delete from test where value = 20")
    t1.commit()
    if level == RC:
        # Row 2 is re-checked after T1 commits (now 30) and kept; row 1 (now 20) never matched.
        assert pending.result(timeout=10) == 0
        assert select(t2, "select * from test where value = 20") == [(1, 20)]
        t2.commit()
    else:
        fails_with(SERIALIZATION_FAILURE, lambda: pending.result(timeout=10))
    assert table() == [(1, 20), (2, 30)]


# --- Lost Update (P4) -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@levels
def test_p4_lost_update(kv_table, session, level):
    """P4 (lost update): a write based on a stale read must not overwrite a committed one."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert select(t1, "select * from test where id = 1") == [(1, 10)]
    assert select(t2, "select * from test where id = 1") == [(1, 10)]
    assert t1.run("update test set value = 11 where id = 1") == 1
    pending = blocks(t2, "update test set value = 11 where id = 1")
    t1.commit()
    if level == RC:
        assert pending.result(timeout=10) == 1  # T1's update is overwritten
        t2.commit()
    else:
        fails_with(SERIALIZATION_FAILURE, lambda: pending.result(timeout=10))
    assert table() == [(1, 11), (2, 20)]


# --- Read Skew (G-single) ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@levels
def test_g_single_read_skew(kv_table, session, level):
    """G-single (read skew): two reads in one transaction see one consistent state."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert select(t1, "select * from test where id = 1") == [(1, 10)]
    assert select(t2, "select * from test where id = 1") == [(1, 10)]
    assert select(t2, "select * from test where id = 2") == [(2, 20)]
    assert t2.run("update test set value = 12 where id = 1") == 1
    assert t2.run("update test set value = 18 where id = 2") == 1
    t2.commit()
    seen = [(2, 18)] if level == RC else [(2, 20)]
    assert select(t1, "select * from test where id = 2") == seen
    t1.commit()
    assert table() == [(1, 12), (2, 18)]


@pytest.mark.django_db(transaction=True)
@levels
def test_g_single_predicate_dependencies(kv_table, session, level):
    """G-single with predicate dependencies: predicate reads see one consistent state."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert select(t1, "select * from test where value % 5 = 0") == [(1, 10), (2, 20)]
    assert t2.run("update test set value = 12 where value = 10") == 1
    t2.commit()
    seen = [(1, 12)] if level == RC else []
    assert select(t1, "select * from test where value % 3 = 0") == seen
    t1.commit()
    assert table() == [(1, 12), (2, 20)]


@pytest.mark.django_db(transaction=True)
@levels
def test_g_single_write_predicate(kv_table, session, level):
    """G-single with a write predicate: a delete cannot act on a state its snapshot never saw."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert select(t1, "select * from test where id = 1") == [(1, 10)]
    assert select(t2, "select * from test") == [(1, 10), (2, 20)]
    assert t2.run("update test set value = 12 where id = 1") == 1
    assert t2.run("update test set value = 18 where id = 2") == 1
    t2.commit()
    if level == RC:
        # A fresh snapshot per statement: row 2 is now 18, so nothing matches.
        assert t1.run("delete from test where value = 20") == 0
        t1.commit()
    else:
        fails_with(SERIALIZATION_FAILURE, lambda: t1.run("delete from test where value = 20"))
    assert table() == [(1, 12), (2, 18)]


# --- Write Skew (G2-item) ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@levels
def test_g2_item_write_skew(kv_table, session, level):
    """G2-item (write skew): two transactions each update a row the other read."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert select(t1, "select * from test where id in (1,2)") == [(1, 10), (2, 20)]
    assert select(t2, "select * from test where id in (1,2)") == [(1, 10), (2, 20)]
    assert t1.run("update test set value = 11 where id = 1") == 1
    assert t2.run("update test set value = 21 where id = 2") == 1
    t1.commit()
    if level == SER:
        fails_with(SERIALIZATION_FAILURE, t2.commit)
        assert table() == [(1, 11), (2, 20)]
    else:
        t2.commit()
        assert table() == [(1, 11), (2, 21)]


# --- Anti-Dependency Cycles (G2) --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@levels
def test_g2_anti_dependency_cycles(kv_table, session, level):
    """G2 (anti-dependency cycle): two transactions each insert into a predicate the other read."""
    t1, t2 = begin(session, level, "T1", "T2")
    assert select(t1, "select * from test where value % 3 = 0") == []
    assert select(t2, "select * from test where value % 3 = 0") == []
    assert t1.run("insert into test (id, value) values(3, 30)") == 1
    assert t2.run("insert into test (id, value) values(4, 42)") == 1
    t1.commit()
    if level == SER:
        fails_with(SERIALIZATION_FAILURE, t2.commit)
        expected = [(3, 30)]
    else:
        t2.commit()
        expected = [(3, 30), (4, 42)]
    with connection.cursor() as cursor:
        cursor.execute("select * from test where value % 3 = 0 order by id")
        assert cursor.fetchall() == expected


@pytest.mark.django_db(transaction=True)
@levels
def test_g2_fekete_two_anti_dependency_edges(kv_table, session, level):
    """G2 after Fekete et al.: a read-only transaction closes a cycle of two anti-dependencies."""
    (t1,) = begin(session, level, "T1")
    assert select(t1, "select * from test") == [(1, 10), (2, 20)]
    (t2,) = begin(session, level, "T2")
    assert t2.run("update test set value = value + 5 where id = 2") == 1
    t2.commit()
    (t3,) = begin(session, level, "T3")
    assert select(t3, "select * from test") == [(1, 10), (2, 25)]
    t3.commit()
    if level == SER:
        fails_with(SERIALIZATION_FAILURE, lambda: t1.run("update test set value = 0 where id = 1"))
        assert table() == [(1, 10), (2, 25)]
    else:
        assert t1.run("update test set value = 0 where id = 1") == 1
        t1.commit()
        assert table() == [(1, 0), (2, 25)]


# --- read only / deferrable -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@levels
def test_read_only_rejects_writes(kv_table, session, level):
    """READ ONLY: a read-only transaction may read but any write fails with 25006."""
    t1 = session(level, read_only=True, name="T1")
    assert t1.isolation_in_force == level
    assert t1.run("show transaction_read_only") == [("on",)]
    assert select(t1, "select * from test") == [(1, 10), (2, 20)]
    fails_with(READ_ONLY_TRANSACTION, lambda: t1.run("update test set value = 11 where id = 1"))
    assert table() == [(1, 10), (2, 20)]


@pytest.mark.django_db(transaction=True)
def test_serializable_read_only_deferrable(kv_table, session):
    """SERIALIZABLE READ ONLY DEFERRABLE: in force as asked, and still rejects writes."""
    with atomic_with_isolation(SER, read_only=True, deferrable=True):
        with connection.cursor() as cursor:
            cursor.execute("show transaction_isolation")
            assert cursor.fetchone() == (SER,)
            cursor.execute("show transaction_deferrable")
            assert cursor.fetchone() == ("on",)
            cursor.execute("select * from test order by id")
            assert cursor.fetchall() == [(1, 10), (2, 20)]
            fails_with(READ_ONLY_TRANSACTION,
                       lambda: cursor.execute("update test set value = 11 where id = 1"))
        # The statement error left the transaction aborted; leave the block by rolling back.
        connection.set_rollback(True)
    assert table() == [(1, 10), (2, 20)]
