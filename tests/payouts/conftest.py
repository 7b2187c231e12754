from collections.abc import Iterator

import pytest
from django.db import connection

from tests.payouts.helpers import Server, server_env


@pytest.fixture(scope="session")
def test_database_url(django_db_setup: None, django_db_blocker: object) -> str:
    """The URL of the test database, for server and worker processes."""
    settings = connection.settings_dict
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    return (f"postgresql://{settings['USER']}{password}@{settings['HOST']}:{settings['PORT']}/"
            f"{settings['NAME']}")


@pytest.fixture(scope="session")
def inline_server(test_database_url: str) -> Iterator[Server]:
    server = Server(server_env(test_database_url, WEBHOOK_PROCESSING="inline"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def deferred_server(test_database_url: str) -> Iterator[Server]:
    server = Server(server_env(test_database_url, WEBHOOK_PROCESSING="deferred"))
    yield server
    server.stop()


@pytest.fixture
def worker_env(test_database_url: str) -> dict[str, str]:
    return server_env(test_database_url)
