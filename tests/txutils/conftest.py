from collections.abc import Iterator

import pytest

import txutils
from tests.dbsessions import Session


@pytest.fixture
def records() -> Iterator[list[txutils.TransactionRecord]]:
    """Every TransactionRecord emitted during the test, in order."""
    seen: list[txutils.TransactionRecord] = []
    txutils.add_sink(seen.append)
    yield seen
    txutils.remove_sink(seen.append)


def write_skew_partner(session_factory, *, name: str = "partner") -> Session:  # type: ignore[no-untyped-def]
    """Commit, from another session, the half of a write skew that dooms the caller.

    The caller's SERIALIZABLE transaction has read both rows of ``test``; this
    session reads them too, moves row 2 and commits. When the caller then writes
    row 1, PostgreSQL must abort it with 40001 (a dangerous structure of two
    rw-dependencies with the partner committed first).
    """
    partner = session_factory("serializable", name=name)
    partner.run("SELECT sum(value) FROM test")
    partner.run("UPDATE test SET value = value - 5 WHERE id = 2")
    partner.commit()
    return partner
