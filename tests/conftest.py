import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection, connections
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from playwright.sync_api import Browser, Playwright, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests import pgbouncer as bouncer
from tests.dbsessions import Session
from tests.payouts.helpers import Server, server_env

# Property tests: the same examples on every run (CI must not fail by luck), no example
# database in the checkout; HYPOTHESIS_PROFILE=explore searches wider and at random.
_PROPERTY = {"deadline": None, "database": None,
             "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture]}
hypothesis_settings.register_profile("default", max_examples=40, derandomize=True, **_PROPERTY)
hypothesis_settings.register_profile("explore", max_examples=400, **_PROPERTY)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def empty_cache() -> None:
    """Each test starts without cached summaries from the one before."""
    cache.clear()


@pytest.fixture(autouse=True)
def ledger_invariants_hold(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that uses the database ends with the ledger's invariant check (what
    ``check_ledger`` runs), before its data is rolled back or flushed. A test that
    breaks the ledger on purpose is marked ``ledger_broken_on_purpose``."""
    if (request.node.get_closest_marker("django_db") is None
            or request.node.get_closest_marker("ledger_broken_on_purpose") is not None):
        yield
        return
    request.getfixturevalue("_django_db_helper")  # set up first, so torn down after this
    yield
    from payouts.invariants import ledger_violations

    violations = ledger_violations()
    assert not violations, "the ledger's invariants are broken:\n" + "\n".join(
        f"  {v.check}: {v.message}" for v in violations)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """One test database per pytest process: runs side by side never share, or drop, one."""
    database = settings.DATABASES["default"]
    database.setdefault("TEST", {})["NAME"] = f"test_{database['NAME']}_{os.getpid()}"


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[bouncer.PgBouncer | None]:
    """With TEST_PGBOUNCER=1, a PgBouncer in transaction pooling in front of the test
    server (tests/pgbouncer.py); None otherwise."""
    if not bouncer.wanted():
        yield None
        return
    db = settings.DATABASES["default"]
    running = bouncer.PgBouncer(db["HOST"], db["PORT"], db["USER"],
                                db.get("PASSWORD") or "").start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, pgbouncer: bouncer.PgBouncer | None,
                    django_db_blocker: Any) -> Iterator[None]:
    """The test database is created (and dropped) straight on the server; with
    TEST_PGBOUNCER=1 every connection in between, of the tests and of the servers and
    workers they start, goes through PgBouncer. At the end PgBouncer stops first, and
    its server sessions must be gone before the database can be dropped."""
    if pgbouncer is None:
        yield
        return
    db = settings.DATABASES["default"]  # the dict every connection, in any thread, reads
    direct = db["HOST"], db["PORT"]
    with django_db_blocker.unblock():
        connections.close_all()
    db["HOST"], db["PORT"] = "127.0.0.1", pgbouncer.port
    yield
    with django_db_blocker.unblock():
        connections.close_all()
        pgbouncer.stop()
        db["HOST"], db["PORT"] = direct
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                if not cursor.fetchone()[0]:
                    break
            time.sleep(0.1)
        connections.close_all()


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


# --- other processes on the test database: gunicorn servers and workers -----------------


@pytest.fixture(scope="session")
def test_database_url(django_db_setup: None, django_db_blocker: object) -> str:
    """The URL of the test database, for server and worker processes."""
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgresql://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


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


# --- one headless chromium per run (tests/browser, tests/security) ------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    # Playwright's sync API keeps an asyncio loop running in this thread, and Django then
    # refuses database calls from it; the test code itself is synchronous throughout.
    # (Only this process: server_env() drops DJANGO_* variables for the server.)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        driver = sync_playwright().start()
        yield driver
        driver.stop()


@pytest.fixture(scope="session")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium "
                    "(apt-get install chromium)", pytrace=False)
    try:
        launched = playwright_driver.chromium.launch(executable_path=str(CHROMIUM),
                                                     args=CHROMIUM_ARGS)
    except PlaywrightError as exc:
        pytest.fail(f"{CHROMIUM} did not start ({exc}); is Debian's chromium installed and "
                    "working? (apt-get install chromium)", pytrace=False)
    yield launched
    launched.close()
