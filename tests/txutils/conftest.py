import contextlib
from collections.abc import Iterator

import pytest

import txutils
from tests.dbsessions import Session


@contextlib.contextmanager
def sink_added(sink: txutils.records.Sink, *, before_commit: bool = False) -> Iterator[None]:
    """``sink`` receives the records of the transactions run inside the block."""
    txutils.add_sink(sink, before_commit=before_commit)
    try:
        yield
    finally:
        txutils.remove_sink(sink)


@pytest.fixture
def records() -> Iterator[list[txutils.TransactionRecord]]:
    """Every TransactionRecord emitted during the test, in order."""
    seen: list[txutils.TransactionRecord] = []
    with sink_added(seen.append):
        yield seen


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
