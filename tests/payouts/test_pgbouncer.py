"""PgBouncer in transaction pooling (docs/deploy.md): the fixture that puts the tests behind
it (TEST_PGBOUNCER=1, .ci/run), and what transaction pooling does to connections."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg2
import pytest
from django.conf import settings
from django.db import connection

from tests import pgbouncer as bouncer

needs_pgbouncer = pytest.mark.skipif(not bouncer.PGBOUNCER.exists(),
                                     reason="Debian's pgbouncer is not installed "
                                            "(make pgbouncer)")


@pytest.mark.django_db
def test_with_test_pgbouncer_every_connection_goes_through_it(
        pgbouncer: bouncer.PgBouncer | None, test_database_url: str) -> None:
    if pgbouncer is None:
        pytest.skip("TEST_PGBOUNCER is not set: the tests connect straight to PostgreSQL")
    db = connection.settings_dict
    assert (db["HOST"], db["PORT"]) == ("127.0.0.1", pgbouncer.port)
    assert f":{pgbouncer.port}/" in test_database_url  # servers and workers too
    assert settings.DATABASE_POOL_MODE == "transaction"
    assert db["DISABLE_SERVER_SIDE_CURSORS"] is True
    with connection.cursor() as cursor:
        cursor.execute("SELECT inet_server_port(), current_database()")
        server_port, database = cursor.fetchone()
    assert server_port == pgbouncer.upstream[1] != pgbouncer.port  # the server, behind it
    pools = {p["database"]: p for p in pgbouncer.admin("SHOW POOLS")}
    assert pools[database]["pool_mode"] == "transaction"
    assert any(c["database"] == database for c in pgbouncer.admin("SHOW CLIENTS"))


@needs_pgbouncer
@pytest.mark.django_db(transaction=True)
def test_transaction_pooling_lends_a_server_connection_per_transaction() -> None:
    """One server connection for two clients: the second client's statement waits while the
    first holds a transaction open, and runs as soon as it ends (the client still
    connected). In session pooling it would wait for the first client to disconnect."""
    db = connection.settings_dict
    server = bouncer.PgBouncer(str(db["HOST"] or "127.0.0.1"), int(db["PORT"]), db["USER"],
                               db.get("PASSWORD") or "", pool_size=1).start()
    first = second = None
    try:
        first = psycopg2.connect(server.url(db["NAME"]))
        second = psycopg2.connect(server.url(db["NAME"]))
        second.autocommit = True
        with first.cursor() as cursor:  # a transaction opened: the one server connection
            cursor.execute("SELECT pg_backend_pid()")
            first_pid = cursor.fetchone()[0]
        answer: list[Any] = []

        def ask() -> None:
            with second.cursor() as cursor:  # type: ignore[union-attr]
                cursor.execute("SELECT pg_backend_pid()")
                answer.append(cursor.fetchone()[0])

        waiting = threading.Thread(target=ask)
        waiting.start()
        time.sleep(0.5)
        assert not answer, "the second client ran while the first held the only connection"
        first.commit()  # transaction over: the server connection goes back to the pool
        waiting.join(10)
        assert answer == [first_pid]  # the same server session, lent to the other client
    finally:
        for conn in (first, second):
            if conn is not None:
                conn.close()
        server.stop()


def test_a_bad_test_pgbouncer_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PGBOUNCER", "maybe")
    with pytest.raises(bouncer.PgBouncerError, match="TEST_PGBOUNCER must be true or false"):
        bouncer.wanted()


def test_a_bad_pool_mode_is_refused() -> None:
    from tests.console.test_settings import settings_in_subprocess

    result = settings_in_subprocess("pass", DATABASE_POOL_MODE="statement")
    assert result.returncode != 0
    assert "DATABASE_POOL_MODE must be 'session'" in result.stderr
    result = settings_in_subprocess(
        "print(settings.DATABASES['default']['DISABLE_SERVER_SIDE_CURSORS'])",
        DATABASE_POOL_MODE="transaction")
    assert result.stdout.strip() == "True", result.stderr
