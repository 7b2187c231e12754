"""``python -m bench [--quick] [--out PATH] [--only SECTION,...]``: the figures of issue 5.

One dedicated embedded PostgreSQL (``var/bench/server``, created fresh, on a free
port), one run, every figure side by side:

1. limit      pgbench replaying the processor's SQL for payout.paid (SERIALIZABLE,
              8 clients, fixed duration, --max-tries), and the whole request's SQL
2. e2e        gunicorn as the README runs it, beside a sweep of other settings (three
              interleaved rounds) + a separate load-generator process (8 keep-alive
              senders), inline processing, distinct payout.paid / payout.failed events
              for N payouts with Stripe-like ids; then an open-loop run at half that
              rate for p99, after a warm-up
3. ingest     deferred mode: events/s stored; then the drain rate of 2 workers
4. hot        8 clients, events for only 10 payouts: events/s, retries, final state
5. console    1 M payouts, 5 M transactions, 2 M events (SQL generate_series):
              server time of the console pages (Django test client, in process)
6. replay     bulk replay of 10 000 failed events (event_replay)
7. failed     a failed payout with 10 000 transactions: its one transaction
8. flood      valid deliveries (open loop) alone, then while 2 000 junk deliveries (bad
              signatures, 64 connections) arrive at once: their p50/p99 during the
              flood against the quiet run; also with one write per refusal (before)
9. prune      5 M transaction logs 60 days old (SQL generate_series); valid deliveries
              (open loop) alone, then while `manage.py prune` deletes them in batches:
              their p50/p99 during the prune against the quiet run (goal: within 2x)

Prints a table and writes ``var/bench/results.json``. Everything it starts
(PostgreSQL, gunicorn, workers, the load generator) is stopped at the end, also
on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import data, limit
from bench.common import (
    LOGS,
    PYTHON,
    REPO,
    SECRET,
    VAR,
    BenchDatabase,
    Processes,
    aggregate_profile,
    child_env,
    fmt,
    free_port,
    gunicorn_argv,
    install_signal_handlers,
    machine,
    manage,
    percentile,
    py_spy,
    say,
    table,
    tree_cpu_s,
    use_bench_database_here,
    wait_http,
    write_json,
)

SECTIONS = ["limit", "e2e", "ingest", "hot", "console", "replay", "failed", "flood", "prune"]
# gunicorn settings the e2e section compares with the recommended one (class, workers,
# threads) on the same load; ``--sweep`` replaces them.
SWEEP = [("gthread", 4, 2), ("gthread", 4, 1), ("gthread", 2, 4), ("sync", 4, 1)]
SWEEP_MARGIN = 1.05  # a setting "beats" the recommended one by 5 % in every round
# The flood: junk signed with a secret that is not the server's, from this many connections.
JUNK_SECRET = "whsec_bench_junk_not_the_servers"
FLOOD_CONNECTIONS = 64
# The open-loop run at half rate opens its connections as its first events fall due; what
# is measured is the steady state after at least this (docs/benchmarks.md).
HALF_RATE_CONNECTIONS = 64
HALF_RATE_WARMUP_S = 2


def warm_up(port: int, requests: int) -> None:
    """Requests that bring every gunicorn worker to steady state (imports, URL resolver,
    database connection, the signature check) before anything is measured: the login
    page, and deliveries refused for a bad signature (nothing stored but a counter)."""
    import http.client

    for i in range(requests):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            if i % 2:
                conn.request("GET", "/login/")
            else:
                conn.request("POST", "/webhooks/stripe/", body=b'{"id": "evt_warm_up"}',
                             headers={"Stripe-Signature": "t=1,v1=00",
                                      "Content-Type": "application/json"})
            conn.getresponse().read()
        finally:
            conn.close()


def recommended_setting() -> tuple[str, int, int]:
    """What the README's production command runs on this machine: console/gunicorn_conf.py."""
    from console import gunicorn_conf

    return (gunicorn_conf.worker_class, gunicorn_conf.workers, gunicorn_conf.threads)


def parse_setting(text: str) -> tuple[str, int, int]:
    """``gthread:4:2`` or ``sync:4`` as (class, workers, threads)."""
    worker_class, workers, *threads = text.split(":")
    setting = (worker_class, int(workers), int(threads[0]) if threads else 1)
    if worker_class == "sync" and setting[2] != 1:
        raise ValueError("sync workers have no threads (gunicorn would run gthread)")
    return setting


def describe(setting: tuple[str, int, int] | list[Any]) -> str:
    worker_class, workers, threads = setting
    if worker_class == "sync":
        return f"sync {workers} workers"
    return f"{worker_class.rsplit('.', 1)[-1]} {workers} workers x {threads} threads"


@dataclass(frozen=True)
class Scale:
    name: str
    limit_payouts: int  # payouts (with stored events) pgbench picks from
    limit_s: int  # pgbench duration
    e2e_payouts: int  # distinct payouts the main end-to-end run sends events for
    e2e_max_s: int  # ... stopping after this long even if not all were sent
    sweep_events: int  # events per run of each gunicorn setting compared
    sweep_rounds: int  # runs of each setting, interleaved
    connections: int  # load-generator connections (threads) for closed-loop runs
    half_rate_s: int  # open-loop run at half the end-to-end rate
    ingest_events: int
    hot_events: int  # events for the 10 hot payouts
    console_payouts: int
    console_items: int  # transactions per console payout
    console_events: int
    replay_events: int
    failed_transactions: int
    page_repeats: int
    settle_s: int  # how long to wait for workers to settle what inline processing left
    drain_max_s: int  # the drain is measured until done or this long
    flood_junk: int  # junk deliveries sent at once
    flood_rate: float  # valid deliveries per second (open loop) beside the flood
    flood_s: float  # how long valid deliveries are sent in each flood run
    prune_txlogs: int  # old transaction logs for prune to delete
    prune_load_s: float  # how long valid deliveries are sent in each prune run

    @staticmethod
    def full() -> Scale:
        return Scale("full", limit_payouts=100_000, limit_s=30, e2e_payouts=100_000,
                     e2e_max_s=120, sweep_events=2_000, sweep_rounds=3, connections=8,
                     half_rate_s=30, ingest_events=6_000, hot_events=1_500,
                     console_payouts=1_000_000, console_items=5, console_events=2_000_000,
                     replay_events=10_000,
                     failed_transactions=10_000, page_repeats=20, settle_s=30, drain_max_s=90,
                     flood_junk=2_000, flood_rate=40, flood_s=15, prune_txlogs=5_000_000,
                     prune_load_s=150)

    @staticmethod
    def quick() -> Scale:
        return Scale("quick", limit_payouts=2_000, limit_s=5, e2e_payouts=1_000,
                     e2e_max_s=20, sweep_events=300, sweep_rounds=1, connections=8, half_rate_s=5,
                     ingest_events=500, hot_events=200, console_payouts=10_000,
                     console_items=5, console_events=20_000, replay_events=100,
                     failed_transactions=1_000, page_repeats=5, settle_s=20, drain_max_s=30,
                     flood_junk=500, flood_rate=40, flood_s=8, prune_txlogs=200_000,
                     prune_load_s=15)


@dataclass
class Section:
    name: str
    figures: dict[str, Any]
    seconds: float = 0.0
    error: str | None = None


class Bench:
    def __init__(self, scale: Scale, only: list[str], what_if: bool = False,
                 profile: bool = False, sweep: list[tuple[str, int, int]] | None = None
                 ) -> None:
        self.scale = scale
        self.sweep = SWEEP if sweep is None else sweep
        self.what_if = what_if
        self.py_spy = py_spy() if profile else None
        self.profile = self.py_spy is not None
        if profile and not self.profile:
            say("--profile: py-spy is not installed (pip install py-spy); running without")
        self.only = only
        self.db = BenchDatabase("server")
        self.procs = Processes()
        self.sections: dict[str, Section] = {}
        self.sellers = (0, 0)
        self.user: Any = None
        self.event_serial = 0

    # --- plumbing ---------------------------------------------------------------------

    def cursor(self) -> Any:
        return data.connect_loader(self.db.url).cursor()

    @contextlib.contextmanager
    def loader(self) -> Iterator[Any]:
        conn = data.connect_loader(self.db.url)
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(self.db.url, **extra)

    @contextlib.contextmanager
    def stack(self, *, mode: str, setting: tuple[str, int, int], workers: int = 0,
              **extra: str) -> Iterator[int]:
        """gunicorn (and ``workers`` process_webhooks) on the bench database; yields the port."""
        port = free_port()
        env = self.env(WEBHOOK_PROCESSING=mode, **extra)
        worker_class, n, threads = setting
        names = [f"gunicorn-{mode}-{worker_class}{n}x{threads}"]
        try:
            server = self.procs.start(names[0], gunicorn_argv(
                port, workers=n, threads=threads, worker_class=worker_class), env)
            wait_http(port, process=server)
            warm_up(port, n * max(threads, 1) * 6)
            for i in range(workers):
                names.append(f"worker-{i}")
                self.start_worker(names[-1], env)
            yield port
        finally:
            for name in names:
                self.procs.stop(name)

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds so far of gunicorn, the workers and the bench PostgreSQL."""
        out = {"gunicorn": 0.0, "workers": 0.0, "postgres": 0.0}
        for name, process in self.procs.children.items():
            if name.startswith("gunicorn"):
                out["gunicorn"] += tree_cpu_s(process.pid)
            elif "worker" in name:
                out["workers"] += tree_cpu_s(process.pid)
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.db.server.pgdata / "postmaster.pid").read_text().split()[0])
            out["postgres"] = tree_cpu_s(pid)
        return out

    def start_profile(self) -> None:
        """py-spy on the gunicorn workers (GIL holders only: where Python spends CPU)."""
        server = next(p for n, p in self.procs.children.items() if n.startswith("gunicorn"))
        self.profile_raw = VAR / "profile-e2e.txt"
        self.profile_raw.unlink(missing_ok=True)
        self.procs.start("py-spy", [self.py_spy, "record", "-p", str(server.pid),
                                    "--subprocesses", "--gil", "--nonblocking", "-r", "100",
                                    "-d", str(min(30, self.scale.e2e_max_s)), "-f", "raw",
                                    "-o", str(self.profile_raw)], self.env())

    def finish_profile(self) -> dict[str, Any]:
        process = self.procs.children.get("py-spy")
        if process is not None:
            with contextlib.suppress(Exception):
                process.wait(60)
            self.procs.stop("py-spy")
        if not self.profile_raw.exists():
            return {"error": f"py-spy wrote nothing; see {LOGS / 'py-spy.log'}"}
        profile = aggregate_profile(self.profile_raw)
        say("   profile (share of GIL-holding samples in gunicorn, inclusive):")
        for share, frame in profile["inclusive"][:18]:
            say(f"     {share:5.1f} %  {frame}")
        return {"raw": str(self.profile_raw.relative_to(REPO)), **profile}

    def start_worker(self, name: str, env: dict[str, str]) -> None:
        self.procs.start(name, [PYTHON, "manage.py", "process_webhooks",
                                "--idle-sleep", "0.2"], env)

    def send(self, name: str, port: int, plan: list[list[Any]], *, connections: int,
             rate: float | None = None, max_s: float, resend: bool = False,
             secret: str = SECRET, warmup_s: float = 0) -> dict[str, Any]:
        """Run the load generator (its own process) on ``plan``; return its result."""
        self.start_load(name, port, plan, connections=connections, rate=rate, max_s=max_s,
                        resend=resend, secret=secret, warmup_s=warmup_s)
        return self.load_result(name, max_s)

    def start_load(self, name: str, port: int, plan: list[list[Any]], *, connections: int,
                   rate: float | None = None, max_s: float, resend: bool = False,
                   secret: str = SECRET, warmup_s: float = 0) -> None:
        """Start the load generator on ``plan``; ``load_result(name)`` waits for it."""
        folder = VAR / "load"
        folder.mkdir(parents=True, exist_ok=True)
        plan_path, spec_path, out_path = (folder / f"{name}.{kind}.json"
                                          for kind in ("plan", "spec", "result"))
        plan_path.write_text(json.dumps(plan))
        spec_path.write_text(json.dumps({
            "port": port, "secret": secret, "plan": str(plan_path), "connections": connections,
            "rate": rate, "max_seconds": max_s, "resend": resend, "warmup_seconds": warmup_s}))
        out_path.unlink(missing_ok=True)
        self.procs.start(f"load-{name}", [PYTHON, "-m", "bench.load", str(spec_path),
                                          str(out_path)], self.env())

    def load_result(self, name: str, max_s: float) -> dict[str, Any]:
        process = self.procs.children[f"load-{name}"]
        out_path = VAR / "load" / f"{name}.result.json"
        try:
            code = process.wait(max_s + 300)
        finally:
            self.procs.stop(f"load-{name}")
        if code != 0 or not out_path.exists():
            raise RuntimeError(f"the load generator failed (code {code}); see {LOGS}")
        return json.loads(out_path.read_text())  # type: ignore[no-any-return]

    def new_prefix(self, what: str) -> str:
        self.event_serial += 1
        return f"evt_{what}{self.event_serial}x"

    def outcome_counts(self, prefix: str) -> dict[str, int]:
        rows = self.db.execute(
            f"SELECT status, count(*) FROM {data.EVENT} WHERE stripe_event_id LIKE %s "
            "GROUP BY status", [prefix + "%"])
        return {status: int(n) for status, n in rows}

    def wait_settled(self, prefix: str, timeout: float) -> dict[str, int]:
        """Wait (bounded) until no event of ``prefix`` is waiting for (re)processing."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.outcome_counts(prefix)
            if not counts.get("received") and not counts.get("failed"):
                return counts
            if time.monotonic() > deadline:
                return counts
            time.sleep(0.5)

    def applied_window(self, prefix: str) -> dict[str, Any]:
        """From the first receipt to the last processing: applied events per second."""
        row = self.db.execute(
            f"""SELECT count(*) FILTER (WHERE status = 'processed'),
                       extract(epoch FROM max(processed_at) - min(received_at))
                FROM {data.EVENT} WHERE stripe_event_id LIKE %s""", [prefix + "%"])[0]
        applied, span = int(row[0]), float(row[1] or 0)
        return {"applied": applied, "applied_span_s": span,
                "applied_per_s": applied / span if span > 0 else None}

    def retry_figures(self, prefix: str) -> dict[str, Any]:
        """Retries of the processor's transactions for these events (TransactionLog)
        and postponements (attempts that ended in 'retry': busy or retries exhausted)."""
        row = self.db.execute(
            f"""SELECT count(DISTINCT e.id), count(t.id), coalesce(sum(t.attempts - 1), 0),
                       count(t.id) FILTER (WHERE t.outcome <> 'committed'),
                       coalesce(sum(cardinality(array_positions(t.sqlstates, '40001'))), 0),
                       coalesce(sum(cardinality(array_positions(t.sqlstates, '40P01'))), 0)
                FROM {data.EVENT} e LEFT JOIN {data.TXLOG} t ON t.event_id = e.id
                WHERE e.stripe_event_id LIKE %s""", [prefix + "%"])[0]
        events, txs, retries, failed, s40001, s40p01 = (int(v) for v in row)
        attempts = dict(self.db.execute(
            f"""SELECT a.outcome, count(*) FROM {data.ATTEMPT} a
                JOIN {data.EVENT} e ON e.id = a.event_id
                WHERE e.stripe_event_id LIKE %s GROUP BY a.outcome""", [prefix + "%"]))
        busy = int(self.db.scalar(
            f"""SELECT count(*) FROM {data.ATTEMPT} a JOIN {data.EVENT} e ON e.id = a.event_id
                WHERE e.stripe_event_id LIKE %s AND a.reason LIKE 'busy%%'""", [prefix + "%"]))
        return {"events": events, "transactions": txs, "tx_retries": retries,
                "tx_retries_per_event": retries / events if events else None,
                "tx_not_committed": failed, "sqlstate_40001": s40001, "sqlstate_40P01": s40p01,
                "attempts_by_outcome": {k: int(v) for k, v in attempts.items()},
                "postponed_busy": busy,
                "attempts_per_event": sum(int(v) for v in attempts.values()) / events
                if events else None}

    @staticmethod
    def latency(result: dict[str, Any], key: str = "latencies_s") -> dict[str, Any]:
        values = result.get(key) or []
        return {f"p{q}_ms": (percentile(values, q) or 0) * 1000 for q in (50, 95, 99)}

    @staticmethod
    def load_summary(result: dict[str, Any]) -> dict[str, Any]:
        keep = ("planned", "sent", "not_sent", "acknowledged", "duplicates_answered",
                "elapsed_s", "ack_per_s", "http_status", "answer_status", "errors", "connects",
                "rate", "connections")
        return {k: result.get(k) for k in keep}

    def payout_plan(self, payouts: data.Payouts, prefix: str, *, failed_every: int = 10,
                    created: int | None = None) -> list[list[Any]]:
        """One event per payout: payout.failed for every ``failed_every``-th, else paid."""
        created = created or int(time.time())
        return [payouts.event(f"{prefix}{pid}",
                              "payout.failed" if pid % failed_every == 0 else "payout.paid",
                              pid, created)
                for pid in range(payouts.first, payouts.last + 1)]

    def fresh_payouts(self, count: int, *, items: int = 3, status: str = "in_transit"
                      ) -> data.Payouts:
        with self.loader() as cur:
            payouts = data.load_payouts(cur, count, items=items, sellers=self.sellers,
                                        status=status, age_days=2, parallel_url=self.db.url)
            for table_name in (data.PAYOUT, data.ITEM, data.TRANSFER, data.TXN):
                cur.execute(f"ANALYZE {table_name}")
        return payouts

    # --- the run ------------------------------------------------------------------------

    def setup(self) -> None:
        started = time.perf_counter()
        self.db.start(fresh=True)
        manage(self.env(), "migrate", "--noinput")
        use_bench_database_here(self.db.url)
        import django

        django.setup()
        logging.getLogger().setLevel(logging.WARNING)
        from django.contrib.auth.models import User

        self.user = User.objects.create_superuser("bench", "bench@example.com", "bench-password")
        with self.loader() as cur:
            self.sellers = data.ensure_sellers(cur, 1000)
        say(f"bench database ready on port {self.db.port} ({time.perf_counter() - started:.1f} s)")

    def run_section(self, name: str, func: Callable[[], dict[str, Any]]) -> None:
        if self.only and name not in self.only:
            return
        say(f"\n== {name}")
        started = time.perf_counter()
        section = Section(name, {})
        try:
            section.figures = func()
        except KeyboardInterrupt:
            raise
        except Exception:
            section.error = traceback.format_exc()
            say(f"!! {name} failed:\n{section.error}")
        section.seconds = time.perf_counter() - started
        self.sections[name] = section
        say(f"   ({section.seconds:.0f} s)")

    # 1. the limit ----------------------------------------------------------------------

    def limit(self) -> dict[str, Any]:
        s = self.scale
        payouts = self.fresh_payouts(s.limit_payouts)
        with self.loader() as cur:
            captured = limit.capture(cur, self.sellers)
        script, request_script = limit.write_scripts(captured)
        variables = {"pid_lo": payouts.first, "pid_hi": payouts.last}
        say(f"   captured {len(captured.transaction)} statements in the processor's transaction, "
            f"{len(captured.request)} in the whole delivery ({captured.outcome}); "
            f"pgbench {s.limit_s} s x 2 scripts ...")
        processor = limit.pgbench(self.db.url, script, clients=8, seconds=s.limit_s,
                                  variables=variables, max_tries=10)
        request = limit.pgbench(self.db.url, request_script, clients=8, seconds=s.limit_s,
                                variables=variables, max_tries=10)
        # Deliveries the request script stored but could not process (retries exhausted)
        # must not wait for the workers of later sections.
        self.db.execute(f"""UPDATE {data.EVENT} SET status = 'skipped', next_attempt_at = NULL,
                            status_reason = 'stored by pgbench' WHERE stripe_event_id LIKE 'evt_P%%'
                            AND status IN ('received', 'failed') RETURNING 1""")
        for label, figures in (("processor transaction", processor),
                               ("whole request", request)):
            say(f"   {label}: {fmt(figures['tps'])} tx/s, retried {fmt(figures['retried'])}, "
                f"failed {fmt(figures['failed'])}, avg {fmt(figures['latency_ms'], 2)} ms")
            if figures.get("error"):
                say(f"   pgbench: {figures['error']}")
        what_if = {}
        if self.what_if:
            for name, path in limit.what_if_scripts(script, request_script).items():
                what_if[name] = limit.pgbench(self.db.url, path, clients=8,
                                              seconds=max(3, s.limit_s // 2),
                                              variables=variables, max_tries=10)
                w = what_if[name]
                say(f"   what if {name}: {fmt(w['tps'])} tx/s, "
                    f"retried {fmt(w['retried'])}, failed {fmt(w['failed'])}")
            self.db.execute(f"""UPDATE {data.EVENT} SET status = 'skipped', next_attempt_at = NULL,
                                status_reason = 'stored by pgbench' WHERE stripe_event_id LIKE
                                'evt_P%%' AND status IN ('received', 'failed') RETURNING 1""")
        return {"processor_tx": processor, "request": request, "what_if": what_if,
                "statements_in_transaction": len(captured.transaction),
                "statements_in_request": len(captured.request) + 1,  # + the health check
                "captured_transaction": captured.transaction}

    # 2. end to end ---------------------------------------------------------------------

    def e2e(self) -> dict[str, Any]:
        s = self.scale
        recommended = recommended_setting()
        settings = [recommended, *(x for x in self.sweep if x != recommended)]
        runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {x: [] for x in settings}
        for _ in range(s.sweep_rounds):
            for setting in settings:  # interleaved, so the machine's drift hits them alike
                payouts = self.fresh_payouts(s.sweep_events)
                prefix = self.new_prefix("S")
                with self.stack(mode="inline", setting=setting, workers=2) as port:
                    result = self.send(f"sweep-{describe(setting).replace(' ', '-')}", port,
                                       self.payout_plan(payouts, prefix),
                                       connections=s.connections, max_s=s.e2e_max_s)
                runs[setting].append({**self.load_summary(result), **self.latency(result),
                                      **self.retry_figures(prefix)})
        sweep = [self.sweep_row(setting, rows, recommended, runs[recommended])
                 for setting, rows in runs.items()]
        for row in sweep:
            say(f"   {row['setting']:<40} {fmt(row['ack_per_s'])} ack/s (median of "
                f"{', '.join(fmt(r) for r in row['runs_ack_per_s'])}), p99 "
                f"{fmt(row['p99_ms'])} ms" + ("  (recommended)" if row["recommended"] else ""))
            if row["beats_recommended"]:
                say(f"   !! {row['setting']} was faster than the recommended setting "
                    f"({describe(recommended)}) in every round")
        setting = recommended

        payouts = self.fresh_payouts(s.e2e_payouts)
        prefix = self.new_prefix("E")
        say(f"   main run: {describe(setting)}, events for {payouts.count:,} payouts "
            f"(at most {s.e2e_max_s} s) ...")
        profile: dict[str, Any] = {}
        with self.stack(mode="inline", setting=setting, workers=2) as port:
            before, wall = self.cpu_snapshot(), time.perf_counter()
            if self.profile:
                self.start_profile()
            result = self.send("e2e", port, self.payout_plan(payouts, prefix),
                               connections=s.connections, max_s=s.e2e_max_s)
            after, wall = self.cpu_snapshot(), time.perf_counter() - wall
            if self.profile:
                profile = self.finish_profile()
            settled = self.wait_settled(prefix, s.settle_s)
        acked = max(result["acknowledged"], 1)
        cpu = {kind: (after[kind] - before.get(kind, 0.0)) for kind in after}
        cpu["load generator"] = result.get("cpu_s") or 0.0
        cpu_ms = {kind: 1000 * v / acked for kind, v in cpu.items()}
        busy = sum(cpu.values()) / wall / (machine()["cores"] or 1)
        main = {"setting": describe(setting), "payouts": payouts.count,
                **self.load_summary(result), **self.latency(result),
                "applied_inline": result["answer_status"].get("processed", 0),
                "final_status": settled, **self.applied_window(prefix),
                "retries": self.retry_figures(prefix), "cpu_ms_per_event": cpu_ms,
                "cpu_busy_share": busy, "profile": profile}
        say("   CPU per event: " + ", ".join(f"{k} {v:.1f} ms" for k, v in cpu_ms.items())
            + f"; the {machine()['cores']} cores were {100 * busy:.0f} % busy")
        say(f"   {fmt(main['acknowledged'])} acknowledged at {fmt(main['ack_per_s'])}/s, "
            f"{fmt(main['applied_inline'])} applied inline, {fmt(main['applied'])} applied in all "
            f"({fmt(main['applied_per_s'])}/s); p50/p95/p99 {fmt(main['p50_ms'])}/"
            f"{fmt(main['p95_ms'])}/{fmt(main['p99_ms'])} ms")

        rate = max(1.0, (main["ack_per_s"] or 1) / 2)
        # Long enough for all 64 connections to have opened, twice over.
        warmup_s = max(HALF_RATE_WARMUP_S, round(2 * HALF_RATE_CONNECTIONS / rate, 1))
        count = max(50, int(rate * (warmup_s + s.half_rate_s)))
        payouts = self.fresh_payouts(count)
        prefix = self.new_prefix("H")
        say(f"   half rate: {rate:.0f} events/s, open loop, {s.half_rate_s} s after "
            f"{warmup_s} s of warm-up ...")
        with self.stack(mode="inline", setting=setting, workers=2) as port:
            result = self.send("half-rate", port, self.payout_plan(payouts, prefix),
                               connections=HALF_RATE_CONNECTIONS, rate=rate,
                               max_s=s.half_rate_s * 3 + 30, warmup_s=warmup_s)
            settled = self.wait_settled(prefix, s.settle_s)
        startup = [latency for due, latency in result["timeline_warmup"]]
        half = {"rate": rate, **self.load_summary(result), **self.latency(result),
                "warmup_s": warmup_s,
                "warmup_max_ms": 1000 * max(startup) if startup else None,
                "service": self.latency(result, "service_s"), "final_status": settled,
                "applied_inline": result["answer_status"].get("processed", 0),
                "retries": self.retry_figures(prefix)}
        say(f"   at {rate:.0f}/s: p50/p95/p99 {fmt(half['p50_ms'])}/{fmt(half['p95_ms'])}/"
            f"{fmt(half['p99_ms'])} ms (from when each event was due); the slowest of the "
            f"warm-up, as 64 connections opened: {fmt(half['warmup_max_ms'])} ms")
        return {"sweep": sweep, "runs": {describe(k): v for k, v in runs.items()}, "main": main,
                "half_rate": half}

    @staticmethod
    def sweep_row(setting: tuple[str, int, int], rows: list[dict[str, Any]],
                  recommended: tuple[str, int, int], baseline: list[dict[str, Any]]
                  ) -> dict[str, Any]:
        """One setting's sweep runs: medians, and whether it beat the recommended setting
        by more than the margin in every round of three or more (the runs of a round are
        back to back; single runs move by about 10 %)."""
        rates = [row["ack_per_s"] or 0.0 for row in rows]

        def median(key: str) -> float | None:
            values = [row[key] for row in rows if row.get(key) is not None]
            return statistics.median(values) if values else None

        beats = setting != recommended and len(rows) >= 3 and all(
            rate > SWEEP_MARGIN * (base["ack_per_s"] or 0)
            for rate, base in zip(rates, baseline, strict=True))
        return {"setting": describe(setting), "gunicorn": setting,
                "recommended": setting == recommended, "connections": rows[0]["connections"],
                "ack_per_s": statistics.median(rates), "runs_ack_per_s": rates,
                "p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"),
                "tx_retries_per_event": median("tx_retries_per_event"),
                "beats_recommended": beats}

    # 3. ingest only, then drain ---------------------------------------------------------

    def ingest(self) -> dict[str, Any]:
        s = self.scale
        setting = recommended_setting()
        payouts = self.fresh_payouts(s.ingest_events)
        prefix = self.new_prefix("I")
        with self.stack(mode="deferred", setting=setting) as port:
            result = self.send("ingest", port, self.payout_plan(payouts, prefix),
                               connections=s.connections, max_s=s.e2e_max_s)
        stored = self.outcome_counts(prefix)
        say(f"   stored {fmt(result['acknowledged'])} at {fmt(result['ack_per_s'])}/s; "
            "draining with 2 workers ...")
        env = self.env(WEBHOOK_PROCESSING="deferred")
        db_started = self.db.scalar("SELECT now()")
        started = time.perf_counter()
        try:
            for i in range(2):
                self.start_worker(f"drain-worker-{i}", env)
            settled = self.wait_settled(prefix, s.drain_max_s)
        finally:
            for i in range(2):
                self.procs.stop(f"drain-worker-{i}")
        wall = time.perf_counter() - started
        row = self.db.execute(
            f"""SELECT count(*) FILTER (WHERE status NOT IN ('received', 'failed')),
                       extract(epoch FROM max(processed_at) - %s)
                FROM {data.EVENT} WHERE stripe_event_id LIKE %s""", [db_started, prefix + "%"])[0]
        done, span = int(row[0]), float(row[1] or wall)
        figures = {"setting": describe(setting),
                   **self.load_summary(result), **self.latency(result),
                   "stored": sum(stored.values()), "drained": done, "drain_s": span,
                   "drain_per_s": done / span if span > 0 else None, "final_status": settled,
                   "retries": self.retry_figures(prefix)}
        say(f"   drained {fmt(done)} in {span:.1f} s: {fmt(figures['drain_per_s'])} events/s")
        return figures

    # 4. hot rows ------------------------------------------------------------------------

    def hot(self) -> dict[str, Any]:
        s = self.scale
        payouts = self.fresh_payouts(10)
        prefix = self.new_prefix("Hot")
        per_payout = max(2, s.hot_events // 10)
        base = int(time.time()) - 2 * per_payout  # distinct created seconds per payout
        plan = []
        for j in range(1, per_payout + 1):  # round robin: each payout's events in order
            for pid in range(payouts.first, payouts.last + 1):
                event_type = "payout.paid" if j == per_payout else "payout.updated"
                plan.append(payouts.event(f"{prefix}{pid}n{j}", event_type, pid, base + j))
        with self.stack(mode="inline", setting=recommended_setting(), workers=2) as port:
            result = self.send("hot", port, plan, connections=8, max_s=s.e2e_max_s)
            settled = self.wait_settled(prefix, s.settle_s + s.hot_events / 10)
        newest = {data.payout_id(pid): f"{prefix}{pid}n{per_payout}"
                  for pid in range(payouts.first, payouts.last + 1)}
        rows = self.db.execute(
            f"""SELECT p.stripe_payout_id, p.status, p.last_event_id, p.events_applied,
                       (SELECT count(*) FROM {data.EVENT} e WHERE e.stripe_object_id =
                        p.stripe_payout_id AND e.status = 'processed')
                FROM {data.PAYOUT} p WHERE p.id BETWEEN %s AND %s""",
            [payouts.first, payouts.last])
        wrong = [r for r in rows if r[1] != "paid" or r[2] != newest[r[0]] or r[3] != 2 + r[4]]
        transfers_wrong = int(self.db.scalar(
            f"""SELECT count(*) FROM {data.TRANSFER} t JOIN {data.ITEM} i
                ON i.payment_transfer_id = t.id WHERE i.payout_id BETWEEN %s AND %s
                AND t.status <> 'paid'""", [payouts.first, payouts.last]))
        figures = {"payouts": 10, "events": len(plan), **self.load_summary(result),
                   **self.latency(result), **self.applied_window(prefix),
                   "final_status": settled, "retries": self.retry_figures(prefix),
                   "state_correct": not wrong and transfers_wrong == 0
                   and not settled.get("received") and not settled.get("failed"),
                   "wrong_payouts": [list(map(str, r)) for r in wrong],
                   "transfers_not_paid": transfers_wrong}
        r = figures["retries"]
        say(f"   {fmt(figures['ack_per_s'])} ack/s; settled {settled}; "
            f"{fmt(r['tx_retries_per_event'], 2)} transaction retries and "
            f"{fmt(r['attempts_per_event'], 2)} attempts per event; "
            f"final state {'right' if figures['state_correct'] else 'WRONG'}")
        return figures

    # 5. the console at scale -------------------------------------------------------------

    def console(self) -> dict[str, Any]:
        s = self.scale
        load = self.load_console()
        from django.test import Client

        client = Client()
        client.force_login(self.user)
        detail_pk = int(self.db.scalar(
            f"SELECT id FROM {data.PAYOUT} WHERE status = 'paid' ORDER BY id DESC LIMIT 1"))
        pages = {
            "payouts page 1": "/payouts/",
            "payouts filtered (status=failed, code)":
                "/payouts/?status=failed&failure_code=no_account",
            "payout detail": f"/payouts/{detail_pk}/",
            "failed events": "/events/?status=failed",
            "transaction logs": "/transactions/",
            "health": "/health/",
            "metrics scrape (Prometheus)": "/metrics",
        }
        from django.conf import settings
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        # The scrape, as Prometheus sends it (the bench's own token).
        settings.METRICS_TOKEN = settings.METRICS_TOKEN or "bench-metrics-token-0123456789"
        scrape = {"HTTP_AUTHORIZATION": f"Bearer {settings.METRICS_TOKEN}"}
        results = {}
        for label, url in pages.items():
            headers = scrape if url == "/metrics" else {}
            with CaptureQueriesContext(connection) as queries:  # also the warm-up
                response = client.get(url, **headers)
            if response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}")
            captured = list(queries.captured_queries)
            slowest = sorted(captured, key=lambda q: -float(q["time"]))[:3]
            times = []
            for _ in range(s.page_repeats):
                started = time.perf_counter()
                response = client.get(url, **headers)
                times.append(time.perf_counter() - started)
                assert response.status_code == 200
            results[label] = {"url": url, "p50_ms": percentile(times, 50) * 1000,
                              "p95_ms": percentile(times, 95) * 1000, "n": len(times),
                              "bytes": len(response.content), "queries": len(captured),
                              "slowest_queries": [{"ms": float(q["time"]) * 1000,
                                                   "sql": q["sql"][:600]} for q in slowest]}
            top = slowest[0] if slowest else {"time": 0, "sql": ""}
            say(f"   {label:<40} p50 {results[label]['p50_ms']:8.1f} ms  "
                f"p95 {results[label]['p95_ms']:8.1f} ms  ({len(captured)} queries; slowest "
                f"{float(top['time']) * 1000:.0f} ms: {' '.join(top['sql'].split())[:70]})")
        return {"data": load, "pages": results}

    def load_console(self) -> dict[str, Any]:
        """Top the database up to the console scale, in SQL; replay's failed events are
        part of it."""
        s = self.scale
        started = time.perf_counter()
        with self.loader() as cur:
            have = dict(self.db.execute(
                f"""SELECT 'payouts', count(*) FROM {data.PAYOUT} UNION ALL
                    SELECT 'transactions', count(*) FROM {data.TXN} UNION ALL
                    SELECT 'events', count(*) FROM {data.EVENT}"""))
            payouts_needed = max(1, s.console_payouts - have["payouts"] - s.replay_events)
            transactions_needed = (s.console_items * s.console_payouts - have["transactions"]
                                   - s.replay_events * 3)
            items = max(1, round(transactions_needed / payouts_needed))
            mix = ("CASE WHEN mod(g, 100) < 70 THEN 'paid' WHEN mod(g, 100) < 80 THEN 'in_transit' "
                   "WHEN mod(g, 100) < 87 THEN 'pending' WHEN mod(g, 100) < 95 THEN 'failed' "
                   "ELSE 'canceled' END")
            payouts = data.load_payouts(cur, payouts_needed, items=items, sellers=self.sellers,
                                        status_sql=mix, age_days=1, spread_days=365,
                                        parallel_url=self.db.url)
            # The failed events staff would replay: payout.paid for in-transit payouts whose
            # processing failed (as after a database outage).
            replay_payouts = data.load_payouts(cur, s.replay_events, items=3,
                                               sellers=self.sellers, age_days=2)
            replay_events = data.load_events(
                cur, payouts=replay_payouts, event_type="payout.paid", status="failed",
                id_prefix="evt_Replay", age_days=0.5, spread_days=0.4, attempts=3,
                error="OperationalError: terminating connection due to administrator command")
            events_needed = max(0, s.console_events - have["events"] - s.replay_events)
            per_payout = max(1, -(-events_needed // max(payouts_needed, 1)))
            status_sql = ("CASE WHEN mod(x.id, 1000) = 0 THEN 'dead' WHEN mod(x.id, 100) = 1 "
                          "THEN 'skipped' ELSE 'processed' END")
            events = data.load_events(cur, payouts=payouts, event_type="payout.paid",
                                      status="processed", id_prefix="evt_Con",
                                      per_payout=per_payout, count=events_needed, age_days=1,
                                      spread_days=365, status_sql=status_sql)
            data.load_history(cur, events, payouts_first=payouts.first, per_payout=per_payout)
            data.load_history(cur, replay_events, payouts_first=replay_payouts.first,
                              per_payout=1)
            loaded_s = time.perf_counter() - started
            data.analyze(cur)
            counts = dict(self.db.execute(
                f"""SELECT 'payouts', count(*) FROM {data.PAYOUT} UNION ALL
                    SELECT 'transactions', count(*) FROM {data.TXN} UNION ALL
                    SELECT 'events', count(*) FROM {data.EVENT} UNION ALL
                    SELECT 'attempts', count(*) FROM {data.ATTEMPT} UNION ALL
                    SELECT 'transaction logs', count(*) FROM {data.TXLOG} UNION ALL
                    SELECT 'failed events', count(*) FROM {data.EVENT} WHERE status = 'failed'"""))
        self.replay_ids = list(range(replay_events[0], replay_events[1] + 1))
        figures = {"counts": {k: int(v) for k, v in counts.items()}, "load_s": loaded_s,
                   "vacuum_analyze_s": time.perf_counter() - started - loaded_s,
                   "database_size": self.db.scalar(
                       "SELECT pg_size_pretty(pg_database_size(current_database()))")}
        say(f"   loaded {', '.join(f'{fmt(v)} {k}' for k, v in figures['counts'].items())} "
            f"in {loaded_s:.0f} s (+{figures['vacuum_analyze_s']:.0f} s VACUUM ANALYZE), "
            f"{figures['database_size']}")
        return figures

    # 6. bulk replay ---------------------------------------------------------------------

    def replay(self) -> dict[str, Any]:
        from payouts.services.processing import event_replay

        ids = getattr(self, "replay_ids", None)
        if ids is None:  # the console section did not run: make the failed events here
            payouts = self.fresh_payouts(self.scale.replay_events)
            with self.loader() as cur:
                first, last = data.load_events(
                    cur, payouts=payouts, event_type="payout.paid", status="failed",
                    id_prefix="evt_Replay", age_days=0.5, attempts=3, error="OperationalError")
            ids = list(range(first, last + 1))
        tally: dict[str, int] = {}
        started = time.perf_counter()
        for event_id in ids:
            outcome = event_replay(event_id=event_id, requested_by=self.user)
            tally[outcome.kind] = tally.get(outcome.kind, 0) + 1
        seconds = time.perf_counter() - started
        figures = {"events": len(ids), "seconds": seconds, "per_s": len(ids) / seconds,
                   "outcomes": tally}
        say(f"   {len(ids):,} replayed in {seconds:.1f} s: {figures['per_s']:.0f} events/s {tally}")
        return figures

    # 7. a failed payout with many transactions ------------------------------------------

    def failed(self) -> dict[str, Any]:
        from payouts import stripe_events
        from payouts.models import TransactionLog
        from payouts.services.processing import event_receive

        n = self.scale.failed_transactions
        payouts = self.fresh_payouts(1, items=n, status="paid")
        obj = stripe_events.payout_object(data.payout_id(payouts.first), status="failed",
                                          amount=payouts.amount_of(payouts.first),
                                          **stripe_events.failed_payout_defaults())
        event = stripe_events.payout_event("payout.failed", obj,
                                           account=payouts.account_of(payouts.first))
        started = time.perf_counter()
        recorded = event_receive(event, stripe_events.encode(event), {})
        wall = time.perf_counter() - started
        assert recorded.event_id is not None and recorded.outcome is not None
        outcome = recorded.outcome
        log = TransactionLog.objects.filter(event_id=recorded.event_id).order_by("-id").first()
        released = int(self.db.scalar(
            f"""SELECT count(*) FROM {data.TXN} t JOIN {data.TRANSFER} tr
                ON tr.payment_transaction_id = t.id JOIN {data.ITEM} i
                ON i.payment_transfer_id = tr.id WHERE i.payout_id = %s AND NOT t.payed_out""",
            [payouts.first]))
        figures = {"transactions": n, "outcome": str(outcome.kind),
                   "transaction_ms": log.duration_ms if log else None,
                   "attempts": log.attempts if log else None, "wall_ms": wall * 1000,
                   "released": released, "correct": released == n}
        say(f"   {n:,} transactions released in one transaction of "
            f"{fmt(figures['transaction_ms'])} ms ({figures['attempts']} attempt(s)); "
            f"all released: {figures['correct']}")
        return figures

    # 8. junk flood ------------------------------------------------------------------------

    def flood(self) -> dict[str, Any]:
        """Valid deliveries at a steady rate, alone and while junk floods in; the junk is
        refused for its signature, and counted: in memory per process, written every 5 s
        (now), or one write per refusal on its reason's row (before, by a setting)."""
        s = self.scale
        setting = recommended_setting()
        say(f"   {describe(setting)}; valid deliveries at {s.flood_rate:.0f}/s for "
            f"{s.flood_s:.0f} s, open loop; {s.flood_junk:,} junk deliveries at once "
            f"(bad signatures, {FLOOD_CONNECTIONS} connections) ...")
        runs = {
            "quiet": self.flood_run("quiet", setting, flush_s=5, junk=False),
            "flood": self.flood_run("flood", setting, flush_s=5, junk=True),
            "flood_before": self.flood_run("before", setting, flush_s=0, junk=True),
        }
        quiet = runs["quiet"]["valid"]
        for key in ("flood", "flood_before"):
            during = runs[key]["during_flood"]
            runs[key]["ratio"] = {q: during[f"{q}_ms"] / quiet[f"{q}_ms"]
                                  if during.get(f"{q}_ms") and quiet.get(f"{q}_ms") else None
                                  for q in ("p50", "p99")}
            r = runs[key]["ratio"]
            say(f"   {runs[key]['label']}: x{fmt(r['p50'], 2)} p50, x{fmt(r['p99'], 2)} p99 "
                "of the quiet figures")
        return {"setting": describe(setting), "rate": s.flood_rate, "seconds": s.flood_s,
                "junk": s.flood_junk, "junk_connections": FLOOD_CONNECTIONS, **runs}

    def send_junk(self, name: str, port: int, count: int) -> dict[str, Any]:
        """``count`` junk deliveries at once from FLOOD_CONNECTIONS connections (bench.junk:
        a sender that spends little CPU, as an attacker's is not the server's)."""
        folder = VAR / "load"
        folder.mkdir(parents=True, exist_ok=True)
        spec_path, out_path = folder / f"{name}.spec.json", folder / f"{name}.result.json"
        spec_path.write_text(json.dumps({"port": port, "count": count, "max_seconds": 120,
                                         "connections": FLOOD_CONNECTIONS,
                                         "secret": JUNK_SECRET}))
        out_path.unlink(missing_ok=True)
        process = self.procs.start(f"junk-{name}", [PYTHON, "-m", "bench.junk",
                                                    str(spec_path), str(out_path)], self.env())
        try:
            process.wait(180)
        finally:
            self.procs.stop(f"junk-{name}")
        return json.loads(out_path.read_text())  # type: ignore[no-any-return]

    def rejection_writes(self) -> int:
        """Row writes (inserts + updates) on the rejection counters so far."""
        self.db.execute("SELECT pg_stat_clear_snapshot()")
        return int(self.db.scalar(
            "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE relname = %s",
            [data.REJECTION]) or 0)

    def rejected(self) -> int:
        return int(self.db.scalar(f"SELECT coalesce(sum(count), 0) FROM {data.REJECTION}"))

    def flood_run(self, name: str, setting: tuple[str, int, int], *, flush_s: float,
                  junk: bool) -> dict[str, Any]:
        s = self.scale
        payouts = self.fresh_payouts(int(s.flood_rate * s.flood_s))
        plan = self.payout_plan(payouts, self.new_prefix("F"))
        junk_count = s.flood_junk if junk else 0
        writes, rejected = self.rejection_writes(), self.rejected()
        junk_result: dict[str, Any] | None = None
        with self.stack(mode="inline", setting=setting,
                        WEBHOOK_REJECTION_FLUSH_SECONDS=str(flush_s)) as port:
            self.start_load(f"flood-{name}", port, plan, connections=32, rate=s.flood_rate,
                            max_s=s.flood_s * 4 + 30)
            if junk_count:
                time.sleep(2 + s.flood_s / 5)  # the valid deliveries' clock is running
                junk_result = self.send_junk(f"flood-{name}-junk", port, junk_count)
            valid = self.load_result(f"flood-{name}", s.flood_s * 4 + 30)
        # gunicorn stopped: each worker wrote the counts it held on its way out, and its
        # sessions reported their statistics.
        time.sleep(0.5)
        figures: dict[str, Any] = {
            "label": {"quiet": "valid deliveries alone",
                      "flood": f"during {s.flood_junk:,} junk, counted in memory",
                      "before": f"during {s.flood_junk:,} junk, a write per refusal (before)"
                      }[name],
            "flush_s": flush_s, "valid": {**self.load_summary(valid), **self.latency(valid)},
            # both with the warm-up's refusals (bad signatures, half its requests)
            "rejection_row_writes": self.rejection_writes() - writes,
            "refusals_counted": self.rejected() - rejected}
        v = figures["valid"]
        if junk_result is not None:
            start = junk_result["clock_started"]
            end = start + junk_result["elapsed_s"]
            base = valid["clock_started"]
            during = [lat for at, lat in valid["timeline"] if start <= base + at <= end]
            figures["junk"] = {k: junk_result.get(k) for k in ("sent", "elapsed_s",
                                                                "http_status", "errors")}
            figures["junk"]["per_s"] = (junk_result["sent"] / junk_result["elapsed_s"]
                                        if junk_result["elapsed_s"] else None)
            figures["during_flood"] = {"n": len(during), **self.latency(
                {"latencies_s": during})}
            d = figures["during_flood"]
            say(f"   {figures['label']}: {fmt(junk_result['sent'])} junk in "
                f"{fmt(junk_result['elapsed_s'], 2)} s ({fmt(figures['junk']['per_s'])}/s, "
                f"{junk_result['http_status']}); {d['n']} valid deliveries meanwhile: p50 "
                f"{fmt(d['p50_ms'])} / p99 {fmt(d['p99_ms'])} ms (whole run p50 "
                f"{fmt(v['p50_ms'])} / p99 {fmt(v['p99_ms'])}); {fmt(figures['refusals_counted'])}"
                f" refusals counted in {fmt(figures['rejection_row_writes'])} row writes")
        else:
            say(f"   {figures['label']}: {fmt(v['acknowledged'])} acknowledged, p50 "
                f"{fmt(v['p50_ms'])} / p99 {fmt(v['p99_ms'])} ms")
        return figures

    # 9. retention: prune beside deliveries ----------------------------------------------

    def prune(self) -> dict[str, Any]:
        """Valid deliveries (inline, open loop) alone, then while ``manage.py prune`` deletes
        ``prune_txlogs`` old transaction logs in batches of 5 000: their p50/p99 while it
        runs against the quiet run."""
        s = self.scale
        setting = recommended_setting()
        say(f"   {describe(setting)}; {s.prune_txlogs:,} transaction logs 60 days old; valid "
            f"deliveries at {s.flood_rate:.0f}/s for up to {s.prune_load_s:.0f} s, open loop ...")
        started = time.perf_counter()
        with self.loader() as cur:
            data.load_old_transaction_logs(cur, s.prune_txlogs, age_days=60)
        built_s = time.perf_counter() - started
        say(f"   built in {built_s:.0f} s")
        quiet = self.prune_run("quiet", setting, prune=False)
        during = self.prune_run("prune", setting, prune=True)
        q, d = quiet["valid"], during["during_prune"]
        ratio = {k: d[f"{k}_ms"] / q[f"{k}_ms"] if d.get(f"{k}_ms") and q.get(f"{k}_ms")
                 else None for k in ("p50", "p99")}
        say(f"   while pruning: x{fmt(ratio['p50'], 2)} p50, x{fmt(ratio['p99'], 2)} p99 of the "
            f"quiet figures (goal: p99 within x2)")
        return {"setting": describe(setting), "rate": s.flood_rate, "txlogs": s.prune_txlogs,
                "built_s": built_s, "quiet": quiet, "prune": during, "ratio": ratio}

    def prune_run(self, name: str, setting: tuple[str, int, int], *,
                  prune: bool) -> dict[str, Any]:
        s = self.scale
        seconds = s.prune_load_s if prune else min(s.prune_load_s, 30)
        payouts = self.fresh_payouts(int(s.flood_rate * seconds))
        plan = self.payout_plan(payouts, self.new_prefix("P"))
        figures: dict[str, Any] = {}
        with self.stack(mode="inline", setting=setting) as port:
            self.start_load(f"prune-{name}", port, plan, connections=32, rate=s.flood_rate,
                            max_s=seconds * 4 + 30)
            if prune:
                time.sleep(2 + seconds / 10)  # the valid deliveries' clock is running
                old = self.old_txlogs()
                begin = time.time()
                process = self.procs.start("prune", [PYTHON, "manage.py", "prune"], self.env())
                code = process.wait(3600)
                end = time.time()
                self.procs.stop("prune")
                counts = self.db.execute("SELECT counts FROM payouts_jobrun WHERE job = 'prune' "
                                         "ORDER BY id DESC LIMIT 1")[0][0]
                figures["prune"] = {"exit": code, "seconds": end - begin,
                                    "old_before": old, "old_after": self.old_txlogs(),
                                    "deleted": counts["transaction_logs"],
                                    "batches": counts["batches"],
                                    "rows_per_s": counts["transaction_logs"] / (end - begin)}
            valid = self.load_result(f"prune-{name}", seconds * 4 + 30)
        figures["valid"] = {**self.load_summary(valid), **self.latency(valid)}
        v = figures["valid"]
        if prune:
            base = valid["clock_started"]
            during = [lat for at, lat in valid["timeline"] if begin <= base + at <= end]
            figures["during_prune"] = {"n": len(during),
                                       **self.latency({"latencies_s": during})}
            # the deliveries' last send: did they cover the whole prune?
            figures["load_outlasted_prune"] = base + max(
                (at for at, _ in valid["timeline"]), default=0) >= end
            p, d = figures["prune"], figures["during_prune"]
            say(f"   prune: {fmt(p['deleted'])} deleted in {fmt(p['batches'])} batches, "
                f"{fmt(p['seconds'], 1)} s ({fmt(p['rows_per_s'])} rows/s), exit {p['exit']}; "
                f"{d['n']} valid deliveries meanwhile: p50 {fmt(d['p50_ms'])} / p99 "
                f"{fmt(d['p99_ms'])} ms" + ("" if figures["load_outlasted_prune"] else
                                           " (the deliveries ended before the prune)"))
        else:
            say(f"   valid deliveries alone: {fmt(v['acknowledged'])} acknowledged, p50 "
                f"{fmt(v['p50_ms'])} / p99 {fmt(v['p99_ms'])} ms")
        return figures

    def old_txlogs(self) -> int:
        return int(self.db.scalar(f"SELECT count(*) FROM {data.TXLOG} "
                                  "WHERE started_at < now() - interval '30 days'"))

    # --- report ---------------------------------------------------------------------------

    def report(self, started_at: datetime, seconds: float) -> dict[str, Any]:
        return {"date": started_at.isoformat(timespec="seconds"), "scale": asdict(self.scale),
                "machine": machine(), "total_s": seconds,
                "sections": {name: {"figures": sec.figures, "seconds": sec.seconds,
                                    "error": sec.error} for name, sec in self.sections.items()},
                "summary": self.summary_rows()}

    def summary_rows(self) -> list[list[str]]:
        rows: list[list[str]] = []
        f = {name: sec.figures for name, sec in self.sections.items()}
        lim = f.get("limit", {})
        limit_tps = (lim.get("processor_tx") or {}).get("tps")
        request_tps = (lim.get("request") or {}).get("tps")

        def ratio(value: float | None) -> str:
            return f"{100 * value / limit_tps:.0f} %" if value and limit_tps else "—"

        if lim:
            p, r = lim["processor_tx"], lim["request"]
            rows.append(["limit: pgbench, processor tx (SERIALIZABLE, 8 clients)",
                         f"{fmt(limit_tps)} tx/s",
                         f"retried {fmt(p['retried'])}, failed {fmt(p['failed'])}", "100 %"])
            rows.append(["pgbench, whole request's SQL", f"{fmt(request_tps)} tx/s",
                         f"retried {fmt(r['retried'])}, failed {fmt(r['failed'])}",
                         ratio(request_tps)])
            for name, w in (lim.get("what_if") or {}).items():
                rows.append([f"what if: {name.replace('_', ' ')}", f"{fmt(w['tps'])} tx/s",
                             f"retried {fmt(w['retried'])}, failed {fmt(w['failed'])}",
                             ratio(w["tps"])])
        e2e = f.get("e2e", {})
        for row in e2e.get("sweep", []):
            mark = " (recommended)" if row.get("recommended") else ""
            rows.append([f"e2e sweep: {row['setting']}{mark}",
                         f"{fmt(row['ack_per_s'])} ack/s",
                         f"median of {len(row['runs_ack_per_s'])}; p50 {fmt(row['p50_ms'])} / "
                         f"p99 {fmt(row['p99_ms'])} ms; "
                         f"{fmt(row['tx_retries_per_event'], 2)} tx retries/event",
                         ratio(row["ack_per_s"])])
        if "main" in e2e:
            m = e2e["main"]
            rows.append([f"e2e inline ({m['setting']}, {m['connections']} conns)",
                         f"{fmt(m['ack_per_s'])} ack/s",
                         f"p50 {fmt(m['p50_ms'])} / p95 {fmt(m['p95_ms'])} / "
                         f"p99 {fmt(m['p99_ms'])} ms; {fmt(m['acknowledged'])} events",
                         ratio(m["ack_per_s"])])
            rows.append(["e2e applied (inline + workers for postponed)",
                         f"{fmt(m['applied_per_s'])} applied/s",
                         f"{fmt(m['applied_inline'])} inline, {fmt(m['applied'])} in all; "
                         f"{fmt(m['retries']['tx_retries_per_event'], 2)} tx retries/event",
                         ratio(m["applied_per_s"])])
        if "half_rate" in e2e:
            h = e2e["half_rate"]
            rows.append([f"e2e at half rate ({h['rate']:.0f}/s, open loop, after "
                         f"{h['warmup_s']} s warm-up)", f"p99 {fmt(h['p99_ms'])} ms",
                         f"p50 {fmt(h['p50_ms'])} / p95 {fmt(h['p95_ms'])} ms; warm-up's "
                         f"slowest {fmt(h['warmup_max_ms'])} ms", ""])
        ing = f.get("ingest", {})
        if ing:
            rows.append(["ingest only (deferred)", f"{fmt(ing['ack_per_s'])} events/s",
                         f"p50 {fmt(ing['p50_ms'])} / p99 {fmt(ing['p99_ms'])} ms",
                         ratio(ing["ack_per_s"])])
            rows.append(["drain, 2 process_webhooks workers", f"{fmt(ing['drain_per_s'])} events/s",
                         f"{fmt(ing['drained'])} in {fmt(ing['drain_s'])} s",
                         ratio(ing["drain_per_s"])])
        hot = f.get("hot", {})
        if hot:
            r = hot["retries"]
            rows.append(["hot rows: 8 clients, 10 payouts", f"{fmt(hot['ack_per_s'])} ack/s, "
                         f"{fmt(hot['applied_per_s'])} applied/s",
                         f"{fmt(r['tx_retries_per_event'], 2)} tx retries + "
                         f"{fmt(r['postponed_busy'] / max(r['events'], 1), 2)} postponements "
                         f"per event; state {'right' if hot['state_correct'] else 'WRONG'}", ""])
        con = f.get("console", {})
        for label, page in (con.get("pages") or {}).items():
            rows.append([f"console: {label}", f"p95 {fmt(page['p95_ms'])} ms",
                         f"p50 {fmt(page['p50_ms'])} ms", ""])
        rep = f.get("replay", {})
        if rep:
            rows.append([f"bulk replay of {fmt(rep['events'])} failed events",
                         f"{fmt(rep['per_s'])} events/s", f"{fmt(rep['seconds'])} s", ""])
        fail = f.get("failed", {})
        if fail:
            rows.append([f"failed payout, {fmt(fail['transactions'])} transactions",
                         f"{fmt(fail['transaction_ms'])} ms", f"{fail['attempts']} attempt(s), "
                         f"released {fmt(fail['released'])}", ""])
        flood = f.get("flood", {})
        if flood.get("quiet"):
            q = flood["quiet"]["valid"]
            rows.append([f"flood: valid deliveries alone ({flood['rate']:.0f}/s)",
                         f"p50 {fmt(q['p50_ms'])} ms", f"p99 {fmt(q['p99_ms'])} ms", ""])
            for key in ("flood", "flood_before"):
                run = flood.get(key)
                if not run or "during_flood" not in run:
                    continue
                d, r = run["during_flood"], run["ratio"]
                rows.append([f"flood: valid {run['label']}",
                             f"p50 {fmt(d['p50_ms'])} ms (x{fmt(r['p50'], 2)})",
                             f"p99 {fmt(d['p99_ms'])} ms (x{fmt(r['p99'], 2)}); junk "
                             f"{fmt(run['junk']['per_s'])}/s; "
                             f"{fmt(run['rejection_row_writes'])} row writes", ""])
        pr = f.get("prune", {})
        if pr.get("prune", {}).get("during_prune"):
            q, d, r = pr["quiet"]["valid"], pr["prune"]["during_prune"], pr["ratio"]
            p = pr["prune"]["prune"]
            rows.append([f"prune: valid deliveries alone ({pr['rate']:.0f}/s)",
                         f"p50 {fmt(q['p50_ms'])} ms", f"p99 {fmt(q['p99_ms'])} ms", ""])
            rows.append([f"prune: valid while {fmt(p['deleted'])} logs are deleted",
                         f"p50 {fmt(d['p50_ms'])} ms (x{fmt(r['p50'], 2)})",
                         f"p99 {fmt(d['p99_ms'])} ms (x{fmt(r['p99'], 2)}); prune "
                         f"{fmt(p['seconds'], 1)} s, {fmt(p['rows_per_s'])} rows/s", ""])
        for name, sec in self.sections.items():
            if sec.error:
                rows.append([f"{name}: FAILED", "", sec.error.strip().splitlines()[-1][:80], ""])
        return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="everything at small scale")
    parser.add_argument("--out", type=lambda p: Path(p).resolve(), default=VAR / "results.json")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the gunicorn workers during the main end-to-end run")
    parser.add_argument("--keep-db", action="store_true",
                        help="leave the bench PostgreSQL running at the end (to inspect "
                             "it); otherwise it is stopped and its files deleted")
    parser.add_argument("--sweep", type=lambda text: [parse_setting(x) for x in text.split(",")
                                                      if x],
                        help="gunicorn settings the e2e section compares with the recommended "
                             "one, e.g. gthread:4:2,sync:8 (class:workers:threads); '' for none")
    parser.add_argument("--what-if", action="store_true",
                        help="also run both pgbench scripts at READ COMMITTED")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    install_signal_handlers()
    _quiet_structlog()
    scale = Scale.quick() if args.quick else Scale.full()
    bench = Bench(scale, only, what_if=args.what_if, profile=args.profile, sweep=args.sweep)
    started_at, started = datetime.now(UTC), time.perf_counter()
    say(f"bench ({scale.name} scale) on {machine()['cores']} cores; logs in {LOGS}")
    random.seed(5)
    try:
        bench.setup()
        bench.run_section("limit", bench.limit)
        bench.run_section("e2e", bench.e2e)
        bench.run_section("ingest", bench.ingest)
        bench.run_section("hot", bench.hot)
        bench.run_section("console", bench.console)
        bench.run_section("replay", bench.replay)
        bench.run_section("failed", bench.failed)
        bench.run_section("flood", bench.flood)
        bench.run_section("prune", bench.prune)
    finally:
        bench.procs.stop_all()
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        if args.keep_db:
            say(f"the bench database is left running: {bench.db.url} "
                "(the next bench run stops and replaces it)")
        else:
            bench.db.remove()
    seconds = time.perf_counter() - started
    report = bench.report(started_at, seconds)
    write_json(args.out, report)
    say("\n" + table(report["summary"], ["figure", "value", "detail", "of limit"]))
    shown = args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    say(f"\n{scale.name} run in {seconds:.0f} s; figures in {shown}")
    return 1 if any(sec.error for sec in bench.sections.values()) else 0


def _quiet_structlog() -> None:
    """The embedded-server helpers log at info; a benchmark prints only its figures."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
