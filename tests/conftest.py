import os
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings
from django.db import connection

from tests.dbsessions import Session


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """One test database per pytest process: runs side by side never share, or drop, one."""
    database = settings.DATABASES["default"]
    database.setdefault("TEST", {})["NAME"] = f"test_{database['NAME']}_{os.getpid()}"


@pytest.fixture
def kv_table(transactional_db: None) -> Iterator[str]:
    """Hermitage's table: ``test (id int primary key, value int)`` with rows (1, 10), (2, 20)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DROP TABLE IF EXISTS test;"
            "CREATE TABLE test (id int PRIMARY KEY, value int);"
            "INSERT INTO test (id, value) VALUES (1, 10), (2, 20);"
        )
    yield "test"
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS test")


@pytest.fixture
def session(transactional_db: None) -> Iterator[Callable[..., Session]]:
    """Open real concurrent sessions: ``session("serializable", name="T1")``; all closed after."""
    opened: list[Session] = []

    def open_session(level: str, **kwargs: object) -> Session:
        new = Session(level, **kwargs)  # type: ignore[arg-type]
        opened.append(new)
        return new

    yield open_session
    for each in opened:
        each.close()
