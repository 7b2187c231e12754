"""gunicorn settings for the console (``gunicorn -c python:console.gunicorn_conf console.wsgi``).

Measured on 2 cores (docs/benchmarks.md, the e2e sweep: 8 keep-alive senders, Stripe-like
ids): two worker processes per core with two threads each. A worker waits on PostgreSQL
for a good part of each request, so two per core keep the cores busy; more threads per
process only queue on its GIL. gthread keeps connections alive and parks one that sends
nothing in its poller, where a sync worker would be held; sync (one connection per request),
one thread per process and 2 x 4 were no faster in the sweep, none of them in every
round. ``make bench`` flags a setting that beats this one in every round.
"""

import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * (os.cpu_count() or 1)))
worker_class = "gthread"
threads = 2
keepalive = 30  # seconds an idle connection stays open for its next delivery
timeout = 30  # a delivery takes milliseconds; a worker stuck this long is restarted
backlog = 256
# gunicorn would take X-Forwarded-Proto from a local peer as HTTPS on its own; only Django
# decides, from DJANGO_SECURE_PROXY_SSL_HEADER.
forwarded_allow_ips = ""


def post_worker_init(worker: object) -> None:
    """The application is loaded: move what it made (modules, settings, apps, models) out
    of the garbage collector's sight, so a full collection walks only what came later."""
    import gc

    gc.collect()  # start-up garbage is freed, not frozen
    gc.freeze()


# --- Prometheus's multiprocess mode (payouts/metrics.py) ---------------------------------
# Each worker process keeps its counters in a file of PROMETHEUS_MULTIPROC_DIR and a scrape
# adds every file up, so /metrics is right whichever worker answers. Unset: a private
# directory for this server, made here before any worker starts and removed at exit. Set
# (to share it with process_webhooks workers on this machine): only the files of processes
# no longer running are removed at start, never a running one's.
_own_metrics_dir: str | None = None


def on_starting(server: object) -> None:
    global _own_metrics_dir
    import re
    import tempfile
    from pathlib import Path

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if not path:
        _own_metrics_dir = path = tempfile.mkdtemp(prefix="payout-console-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # the workers inherit it
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    for file in Path(path).glob("*.db"):
        match = re.fullmatch(r"[a-z_]+_(\d+)\.db", file.name)
        if match and not _running(int(match.group(1))):
            file.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def child_exit(server: object, worker: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    import shutil

    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
