"""Deliveries for payouts Stripe made close in time do not make each other fail.

Stripe's ids begin with their creation time and the platform, so payouts made close
in time share a long prefix and are neighbours in a btree on the id. SERIALIZABLE
locks the index pages a lookup reads, and a status change writes a new entry into
every index of the payout: two deliveries for neighbours, each reading before the
other writes, form a cycle and one fails with 40001. The processor finds payouts
through a hash index (``payout_stripe_id_hash``), which scatters neighbours over its
buckets. These tests use two real sessions and the processor's own lookup.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import OperationalError, connection

import txutils
from payouts.models import Payout
from payouts.services.ledger import LOCK_SQL
from tests.dbsessions import Session
from tests.factories import make_payout

pytestmark = pytest.mark.django_db(transaction=True)

PREFIX = "po_1Pgc79B7WZ01zgkW"  # a Stripe-like prefix: time and platform
ROWS = 20_000  # enough for the hash index to have many buckets, as a real ledger does
LOOKUP = LOCK_SQL.format(column="stripe_payout_id", nowait="")
# The processor's status change (APPLY_SQL's, reduced to what the indexes see).
UPDATE = ("UPDATE payouts_payout SET status = 'paid', updated_at = now() "
          "WHERE stripe_payout_id = %s")
HASH_INDEX = "payout_stripe_id_hash"


def stripe_id(n: int) -> str:
    return f"{PREFIX}{n:09d}"


@pytest.fixture
def ledger() -> Iterator[None]:
    """ROWS in-transit payouts with neighbouring Stripe ids, copied from one made normally."""
    template = make_payout(stripe_payout_id=stripe_id(0), transactions=1)
    columns = [f.column for f in Payout._meta.concrete_fields
               if f.column not in ("id", "stripe_payout_id", "reference")]
    listed = ", ".join(columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO payouts_payout (stripe_payout_id, {listed}) "
            f"SELECT %s || lpad(g::text, 9, '0'), {listed} FROM payouts_payout, "
            "generate_series(1, %s) g WHERE id = %s", [PREFIX, ROWS, template.pk])
        cursor.execute("ANALYZE payouts_payout")
    yield


def interleaved(first: str, second: str) -> bool:
    """Both look their payout up, then both change its status; the second commits first.
    True when either step ends in a serialization failure (40001)."""
    one, two = Session("serializable", name="first"), Session("serializable", name="second")
    try:
        one.run(LOOKUP, [first])
        two.run(LOOKUP, [second])
        one.run(UPDATE, [first])
        two.run(UPDATE, [second])
        two.commit()
        one.commit()
        return False
    except OperationalError as exc:
        assert txutils.sqlstate_of(exc) == txutils.SERIALIZATION_FAILURE, exc
        return True
    finally:
        one.close()
        two.close()


def uses_index(sql: str, value: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {sql}", [value])
        return "\n".join(row[0] for row in cursor.fetchall())


PAIRS = [(1_000, 1_001), (5_000, 5_001), (9_000, 9_001), (13_000, 13_001)]
CONTROL_PAIRS = [(3_000, 3_001), (7_000, 7_001), (11_000, 11_001), (15_000, 15_001)]


def test_the_processor_finds_a_payout_through_the_hash_index(ledger):
    assert HASH_INDEX in uses_index(LOOKUP, stripe_id(42))
    assert HASH_INDEX in uses_index(UPDATE, stripe_id(42))


def test_deliveries_for_neighbouring_payouts_do_not_make_each_other_fail(ledger):
    # A pair whose ids fall in the same bucket still conflicts (about 1 in 60 here).
    conflicts = [interleaved(stripe_id(a), stripe_id(b)) for a, b in PAIRS]
    assert sum(conflicts) <= 1, conflicts

    # Control: through the btree on the id, the same pattern fails nearly every time.
    with connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX {HASH_INDEX}")
    try:
        control = [interleaved(stripe_id(a), stripe_id(b)) for a, b in CONTROL_PAIRS]
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE INDEX {HASH_INDEX} ON payouts_payout "
                           "USING hash (stripe_payout_id)")
    assert sum(control) >= 3, control
