"""The embedded PostgreSQL: started on demand, shared, durable, and clear when it cannot start.

Each test runs its own server in a temporary directory on a free port, so the
suite's own database is never touched.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import structlog

from console.embedded_db import EmbeddedDatabaseError, EmbeddedPostgres, _bin_path
from tests.payouts.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    embedded = EmbeddedPostgres(var_dir=tmp_path / "var", port=free_port())
    yield embedded
    embedded.stop()


def query(server: EmbeddedPostgres, database: str, sql: str) -> list[tuple]:
    with contextlib.closing(psycopg2.connect(server.url(database))) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []


def test_first_use_initialises_starts_and_creates_the_database(server):
    assert not server.is_running()
    server.ensure_running(database="app")
    assert server.is_running()
    assert query(server, "app", "SELECT current_database()") == [("app",)]
    assert (server.pgdata / "PG_VERSION").exists()


def test_data_survives_a_restart(server):
    server.ensure_running(database="app")
    query(server, "app", "CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
    assert server.stop() is True
    assert not server.is_running()
    server.ensure_running(database="app")
    assert query(server, "app", "SELECT v FROM kept") == [(42,)]


def test_many_processes_starting_at_once_share_one_server(server):
    code = (
        "import sys; from pathlib import Path; from console.embedded_db import EmbeddedPostgres;"
        f"s = EmbeddedPostgres(var_dir=Path({str(server.var_dir)!r}), port={server.port});"
        "s.ensure_running(database='app'); print(s._postmaster_pid())"
    )
    starters = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in starters]
    assert [p.returncode for p in starters] == [0, 0, 0, 0], results
    pids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(pids) == 1  # one postmaster, found running by three of them
    assert query(server, "app", "SELECT 1") == [(1,)]


def test_a_server_left_running_on_a_deleted_directory_is_replaced(server):
    server.ensure_running(database="app")
    orphan = server._postmaster_pid()
    shutil.rmtree(server.var_dir)  # the checkout removed while its server runs
    with structlog.testing.capture_logs() as logs:
        server.ensure_running(database="app")
    assert server._postmaster_pid() != orphan
    assert query(server, "app", "SELECT 1") == [(1,)]
    assert any(e["event"] == "embedded_db.orphan_stopped" and e["pid"] == orphan for e in logs)


def test_a_taken_port_is_named_in_the_error(server):
    with socket.socket() as squatter:
        squatter.bind((server.host, server.port))
        squatter.listen()
        with pytest.raises(EmbeddedDatabaseError, match=rf"port {server.port} .* taken") as err:
            server.ensure_running()
    assert "EMBEDDED_PG_PORT" in str(err.value)
    assert not server.is_running()


def test_a_server_running_on_another_port_than_configured_is_reported(server):
    server.ensure_running()
    moved = EmbeddedPostgres(var_dir=server.var_dir, port=free_port())
    with pytest.raises(EmbeddedDatabaseError, match=rf"running on port {server.port}.*stop"):
        moved.ensure_running()


def test_an_unwritable_directory_is_named_in_the_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    server = EmbeddedPostgres(var_dir=blocker / "var", port=free_port())
    with pytest.raises(EmbeddedDatabaseError, match=r"cannot write to .*not-a-directory"):
        server.ensure_running()


def test_a_stale_pidfile_from_a_crash_is_cleared(server):
    server.ensure_running()
    server.stop()
    # After a crash the file stays, and its pid may now belong to another program.
    (server.pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{server.pgdata}\n")
    with structlog.testing.capture_logs() as logs:
        server.ensure_running(database="app")
    assert server.is_running()
    assert any(e["event"] == "embedded_db.stale_pidfile" and e["pid"] == os.getpid()
               for e in logs)


def test_a_server_that_will_not_start_shows_its_log(server):
    server.ensure_running()
    server.stop()
    with (server.pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\nshared_buffers = 'lots'\n")
    with pytest.raises(EmbeddedDatabaseError, match="shared_buffers") as err:
        server.ensure_running()
    assert "server.log" in str(err.value)


def test_the_wheel_ships_pgbench_and_psql():
    assert (_bin_path() / "pgbench").exists() and (_bin_path() / "psql").exists()


def run_manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = os.environ | {"DATABASE_URL": "embedded"} | env  # asked for explicitly
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_any_manage_command_starts_the_checkouts_server_on_first_use(tmp_path):
    env = {"EMBEDDED_PG_DIR": str(tmp_path / "var"), "EMBEDDED_PG_PORT": str(free_port())}
    try:
        migrated = run_manage("migrate", "--noinput", env=env)
        assert migrated.returncode == 0, migrated.stderr
        # Another process finds it running and sees what the first one wrote.
        shell = run_manage("shell", "--no-imports", "-c",
                           "from django.contrib.auth.models import Permission;"
                           "print(Permission.objects.count() > 0)", env=env)
        assert shell.stdout.strip() == "True", shell.stderr
        status = run_manage("embedded_db", "status", env=env)
        assert status.stdout.startswith("running"), status.stderr
    finally:
        stopped = run_manage("embedded_db", "stop", env=env)
        assert stopped.stdout.strip() == "stopped", stopped.stderr


def test_a_bad_port_setting_is_refused_clearly(tmp_path):
    result = run_manage("check", env={"EMBEDDED_PG_DIR": str(tmp_path), "EMBEDDED_PG_PORT": "x"})
    assert result.returncode != 0
    assert "EMBEDDED_PG_PORT must be a TCP port number" in result.stderr


def test_with_database_url_nothing_embedded_is_started(tmp_path):
    env = {"EMBEDDED_PG_DIR": str(tmp_path / "var"),
           "DATABASE_URL": "postgresql://someone@127.0.0.1:1/elsewhere"}
    result = run_manage("shell", "--no-imports", "-c", "from django.conf import settings;"
                        "d = settings.DATABASES['default'];"
                        "print(d['ENGINE'], d['HOST'], d['PORT'], d['NAME'])", env=env)
    assert result.stdout.split() == ["django.db.backends.postgresql", "127.0.0.1", "1",
                                     "elsewhere"], result.stderr
    assert not (tmp_path / "var").exists()
