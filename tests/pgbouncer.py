"""A PgBouncer in transaction pooling in front of a PostgreSQL server, for the tests
(``TEST_PGBOUNCER=1``, tests/conftest.py) and the scaled-out soak (``bench.soak
--pgbouncer``).

Debian's ``/usr/sbin/pgbouncer`` (``make pgbouncer``), started on a free port on
127.0.0.1 with its config, user list, log and pid file in a temporary directory,
forwarding every database name to the server (a wildcard entry, so test databases
created later need nothing), and stopped at the end. As root it runs as the ``nobody``
user: PgBouncer refuses to run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2

PGBOUNCER = Path("/usr/sbin/pgbouncer")
ADMIN_DB = "pgbouncer"  # its admin console: SHOW POOLS, SHOW CLIENTS, ...
START_TIMEOUT_S = 15.0


class PgBouncerError(RuntimeError):
    pass


def wanted() -> bool:
    """``TEST_PGBOUNCER``: run the tests' connections through PgBouncer (.ci/run)."""
    value = os.environ.get("TEST_PGBOUNCER", "").strip().lower()
    if value in {"", "0", "false", "no", "off"}:
        return False
    if value in {"1", "true", "yes", "on"}:
        return True
    raise PgBouncerError(f"TEST_PGBOUNCER must be true or false (1/0, yes/no, on/off), "
                         f"not {os.environ['TEST_PGBOUNCER']!r}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """``PgBouncer(host, port, user, password).start()``; ``.port`` is where clients
    connect; ``.stop()`` when done."""

    def __init__(self, host: str, port: int, user: str, password: str = "", *,
                 pool_size: int = 20, max_clients: int = 400) -> None:
        self.upstream = (host, int(port))
        self.user = user
        self.password = password
        self.pool_size = pool_size
        self.max_clients = max_clients
        self.port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        host, port = self.upstream
        server_password = f" password={self.password}" if self.password else ""
        return "\n".join([
            "[databases]",
            f"* = host={host} port={port}{server_password}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "pool_mode = transaction",
            # trust when the server trusts (the tests' servers); the password otherwise
            f"auth_type = {'md5' if self.password else 'trust'}",
            "auth_file = userlist.txt",
            f"admin_users = {self.user}",
            f"default_pool_size = {self.pool_size}",
            f"max_client_conn = {self.max_clients}",
            # psycopg2 and pgbench send these at start-up; nothing here relies on them
            "ignore_startup_parameters = extra_float_digits,options",
            # a server restarted under it: retry its connections soon, not after 15 s
            "server_login_retry = 1",
            "logfile = pgbouncer.log",
            "pidfile = pgbouncer.pid",
            "",
        ])

    def start(self) -> PgBouncer:
        if not PGBOUNCER.exists():
            raise PgBouncerError(f"{PGBOUNCER} not found: install Debian's pgbouncer "
                                 "(make pgbouncer, or apt-get install pgbouncer)")
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        (self.dir / "pgbouncer.ini").write_text(self.config())
        (self.dir / "userlist.txt").write_text(
            f"{_quoted(self.user)} {_quoted(self.password)}\n")
        argv = [str(PGBOUNCER)]
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            argv += ["-u", "nobody"]
        argv.append(str(self.dir / "pgbouncer.ini"))
        self.process = subprocess.Popen(argv, cwd=self.dir, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PgBouncerError(f"pgbouncer exited ({self.process.returncode}): "
                                     f"{self.log_tail()}")
            try:
                self.admin("SHOW VERSION")
                return
            except psycopg2.Error as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PgBouncerError(f"pgbouncer did not answer on port {self.port}: "
                                         f"{exc}; {self.log_tail()}") from exc
                time.sleep(0.1)

    def log_tail(self, lines: int = 10) -> str:
        try:
            assert self.dir is not None
            return " | ".join((self.dir / "pgbouncer.log").read_text().splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no log)"

    def admin(self, command: str) -> list[dict[str, object]]:
        """A command on PgBouncer's admin console (``SHOW POOLS``...): its rows as dicts."""
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, dbname=ADMIN_DB,
                                user=self.user, password=self.password or None,
                                connect_timeout=2)
        try:
            conn.autocommit = True  # the console takes no transactions
            with conn.cursor() as cursor:
                cursor.execute(command)
                if cursor.description is None:
                    return []
                names = [column.name for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            conn.close()

    def url(self, database: str) -> str:
        password = f":{self.password}" if self.password else ""
        return f"postgresql://{self.user}{password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        """Stop it (its server connections close with it) and delete its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # PgBouncer's immediate shutdown
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
