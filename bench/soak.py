"""``python -m bench.soak [--quick] [--events N] [--rate R] [--pgbouncer | --drop F [--silent F]]``:
nothing acknowledged is lost.

Events go at a steady rate through gunicorn in deferred mode to two
``process_webhooks`` workers, while

* a worker is killed with SIGKILL every few seconds (and started again),
* the PostgreSQL server is restarted once, half-way through (connections cut,
  a few seconds down: deliveries then fail and are sent again, as Stripe does),
* some events are delivered twice and events of a payout arrive out of order.

At the end it prints acknowledged, stored, applied exactly once, lost (must be 0),
duplicated effects (must be 0), and checks the ledger: each payout at the status of
its newest event, ``payed_out`` false exactly for the transactions of failed payouts,
transfers failed / paid with their payout. Exits 1 if anything does not hold.

With ``--pgbouncer`` (``make soak-pgbouncer``), scaled out as docs/deploy.md describes:
two gunicorn nodes on their own ports, each sent half of the deliveries, and three
workers, every connection through one PgBouncer in transaction pooling (Debian's
pgbouncer, ``tests/pgbouncer.py``); the same restart, kills and checks.

With ``--drop F`` (``make soak-sync``), Stripe is the source of truth: a fake Stripe
(``tests/fakestripe.py``, in this process on 127.0.0.1) holds every payout in the
state its events lead to and lists exactly those events; a share ``F`` of them is
never delivered, and a share ``--silent`` of the payouts (2 % by default) changed at
Stripe with no event listed or delivered. After the load, ``sync_events --days 1``
and ``reconcile_payouts --apply`` must bring every payout to Stripe's state (nothing
lost, nothing applied twice, nothing held, ``check_ledger`` clean), and running both
again must change nothing. See ``StripeSoak``.

Runs on its own embedded PostgreSQL (``var/bench/soak``), created fresh.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import random
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bench import data
from bench.common import (
    LOGS,
    PYTHON,
    REPO,
    SECRET,
    VAR,
    BenchDatabase,
    Processes,
    child_env,
    free_port,
    gunicorn_argv,
    install_signal_handlers,
    machine,
    manage,
    say,
    table,
    wait_http,
    write_json,
)
from bench.load import build_body

if TYPE_CHECKING:
    from tests.fakestripe import FakeStripe
    from tests.pgbouncer import PgBouncer

# Deferred mode; a killed worker's claim comes back after the lease; failures retry soon.
SOAK_ENV = {"WEBHOOK_PROCESSING": "deferred", "WEBHOOK_LEASE_SECONDS": "5",
            "WEBHOOK_RETRY_BASE_SECONDS": "0.5", "WEBHOOK_RETRY_MAX_SECONDS": "2"}
TYPES = [("payout.updated", "in_transit"), ("payout.paid", "paid"), ("payout.failed", "failed")]


def steps_of(pid: int) -> int:
    """Each payout's events: updated and paid, and for one in four failed too."""
    return 3 if pid % 4 == 0 else 2


def payouts_needed(first_payout: int, events: int) -> int:
    pid, planned = first_payout, 0
    while planned < events:
        planned += steps_of(pid)
        pid += 1
    return pid - first_payout


def make_plan(payouts: data.Payouts, events: int, rng: random.Random, *,
              duplicate_share: float, reorder_window: int,
              ) -> tuple[list[list[Any]], dict[str, str]]:
    """``events`` distinct events for ``payouts`` (see ``steps_of``, with increasing
    ``created``), locally shuffled, with duplicates mixed in. Returns the plan and
    each event's payout."""
    distinct = distinct_events(payouts, events)
    plan = deliveries(distinct, rng, duplicate_share=duplicate_share,
                      reorder_window=reorder_window)
    owner = {row[0]: row[2] for row in distinct}
    return plan, owner


def distinct_events(payouts: data.Payouts, events: int) -> list[list[Any]]:
    """The first ``events`` plan rows of ``payouts`` (``steps_of`` each, a minute apart,
    the first an hour ago), payout by payout."""
    base = int(time.time()) - 3600
    distinct: list[list[Any]] = []
    for pid in range(payouts.first, payouts.last + 1):
        for n in range(steps_of(pid)):
            event_type, _status = TYPES[n]
            distinct.append(payouts.event(f"evt_Soak{pid}n{n}", event_type, pid, base + n * 60))
    return distinct[:events]


def deliveries(distinct: list[list[Any]], rng: random.Random, *, duplicate_share: float,
               reorder_window: int) -> list[list[Any]]:
    """``distinct`` locally shuffled, with a share of them sent twice."""
    plan = list(distinct)
    for i in range(len(plan)):  # reorder: swap with a near neighbour
        j = min(len(plan) - 1, max(0, i + rng.randint(-reorder_window, reorder_window)))
        plan[i], plan[j] = plan[j], plan[i]
    for row in rng.sample(distinct, int(len(distinct) * duplicate_share)):
        plan.insert(min(len(plan), plan.index(row) + rng.randint(1, 200)), list(row))
    return plan


class Soak:
    nodes = 1  # gunicorn nodes, each on its own port, each with its own load generator
    workers = 2

    def __init__(self, events: int, rate: float, *, restart_down_s: float,
                 kill_every: tuple[float, float]) -> None:
        self.events = events
        self.rate = rate
        self.restart_down_s = restart_down_s
        self.kill_every = kill_every
        self.db = BenchDatabase("soak")
        self.procs = Processes()
        self.rng = random.Random(10_000)
        self.kills = 0
        self.restarted_at: float | None = None
        self.log: list[str] = []

    def stop(self) -> None:
        """Stop everything this soak started and delete its database."""
        self.procs.stop_all()
        with contextlib.suppress(Exception):
            self.db.remove()

    def note(self, text: str) -> None:
        say(f"   [{time.strftime('%H:%M:%S')}] {text}")
        self.log.append(text)

    def app_env(self) -> dict[str, str]:
        """The environment of gunicorn, the workers and manage.py."""
        return child_env(self.db.url, **SOAK_ENV)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.db.start(fresh=True)
        env = self.app_env()
        manage(env, "migrate", "--noinput")
        conn = data.connect_loader(self.db.url)
        with conn.cursor() as cur:
            sellers = data.ensure_sellers(cur, 100)
            n_payouts = payouts_needed(data.next_id(cur, data.PAYOUT), self.events)
            payouts = data.load_payouts(cur, n_payouts, items=3, sellers=sellers,
                                        status="pending", age_days=1)
            plan, owner = self.make_plan(payouts)
            data.analyze(cur)
        conn.close()
        self.announce(plan, owner, payouts)

        ports = [free_port() for _ in range(self.nodes)]
        for node, port in enumerate(ports):
            server = self.procs.start(f"soak-gunicorn-{node}", gunicorn_argv(
                port, workers=2, threads=8, worker_class="gthread"), env)
            wait_http(port, process=server)
        for i in range(self.workers):
            self.start_worker(i, env)

        folder = VAR / "load"
        folder.mkdir(parents=True, exist_ok=True)
        load_s = len(plan) / self.rate
        loads, outs = [], []
        for node, port in enumerate(ports):  # each node its share of the deliveries
            plan_path, spec_path, out_path = (folder / f"soak-{node}.{k}.json"
                                              for k in ("plan", "spec", "result"))
            plan_path.write_text(json.dumps(plan[node::self.nodes]))
            spec_path.write_text(json.dumps({
                "port": port, "secret": SECRET, "plan": str(plan_path),
                "connections": 32 // self.nodes, "rate": self.rate / self.nodes,
                "max_seconds": load_s * 2 + 120, "resend": True, "sample_every": 1}))
            out_path.unlink(missing_ok=True)
            outs.append(out_path)
            loads.append(self.procs.start(f"soak-load-{node}", [
                PYTHON, "-m", "bench.load", str(spec_path), str(out_path)], env))
        load_started = time.perf_counter()
        restart_at = load_started + load_s / 2
        next_kill = load_started + self.rng.uniform(*self.kill_every)
        victim = 0
        while any(load.poll() is None for load in loads):
            now = time.perf_counter()
            if now > load_started + load_s * 2 + 300:
                raise RuntimeError("the load generator did not finish in time")
            if self.restarted_at is None and now >= restart_at:
                self.note(f"restarting PostgreSQL ({self.restart_down_s:.0f} s down) ...")
                self.db.restart(down_s=self.restart_down_s)
                self.restarted_at = time.perf_counter() - load_started
                self.note("PostgreSQL is back")
            if now >= next_kill:
                self.procs.kill(f"soak-worker-{victim}")
                self.kills += 1
                self.start_worker(victim, env)
                victim = (victim + 1) % self.workers
                next_kill = now + self.rng.uniform(*self.kill_every)
            time.sleep(0.05)
        self.note(f"load done in {time.perf_counter() - load_started:.0f} s; "
                  f"{self.kills} workers killed; waiting for the workers to settle everything")
        for node in range(self.nodes):
            self.procs.stop(f"soak-load-{node}")
        if not all(out.exists() for out in outs):
            raise RuntimeError(f"a load generator wrote no result; see {LOGS}")
        result = merged([json.loads(out.read_text()) for out in outs])
        settled_s = self.wait_settled(timeout=max(120.0, self.events / 20))
        self.note(f"settled {settled_s:.0f} s after the load")
        figures = self.after_load(env, result, owner, payouts, plan)
        figures.update({"kills": self.kills, "db_restart_at_s": self.restarted_at,
                        "db_down_s": self.restart_down_s, "settle_s": settled_s,
                        "rate": self.rate, "total_s": time.perf_counter() - started,
                        "notes": self.log})
        return figures

    def make_plan(self, payouts: data.Payouts) -> tuple[list[list[Any]], dict[str, str]]:
        """The deliveries, and each distinct event's payout."""
        return make_plan(payouts, self.events, self.rng, duplicate_share=0.05,
                         reorder_window=25)

    def announce(self, plan: list[list[Any]], owner: dict[str, str],
                 payouts: data.Payouts) -> None:
        say(f"soak: {self.events:,} events ({len(plan) - self.events:,} more as duplicates) for "
            f"{payouts.count:,} payouts at {self.rate:.0f}/s; deferred mode, 2 workers")

    def after_load(self, env: dict[str, str], result: dict[str, Any], owner: dict[str, str],
                   payouts: data.Payouts, plan: list[list[Any]]) -> dict[str, Any]:
        """Everything settled: the checks."""
        figures = self.check(result, owner, payouts, plan)
        figures.update(self.check_ledger(env))
        figures["invariants_hold"] = (figures["invariants_hold"]
                                      and figures["check_ledger_exit"] == 0)
        return figures

    def start_worker(self, i: int, env: dict[str, str]) -> None:
        self.procs.start(f"soak-worker-{i}", [PYTHON, "manage.py", "process_webhooks",
                                              "--idle-sleep", "0.2"], env)

    def check_ledger(self, env: dict[str, str]) -> dict[str, Any]:
        """``manage.py check_ledger`` on the soak's database: the money invariants."""
        result = subprocess.run([PYTHON, "manage.py", "check_ledger"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600, check=False)
        violations = [line for line in result.stdout.splitlines()
                      if not line.startswith("ledger ok")]
        return {"check_ledger_exit": result.returncode, "ledger_violations": len(violations),
                "ledger_violation_examples": violations[:5]}

    def pending(self) -> int:
        return int(self.db.scalar(f"SELECT count(*) FROM {data.EVENT} "
                                  "WHERE status IN ('received', 'failed')"))

    def wait_settled(self, timeout: float) -> float:
        started = time.perf_counter()
        while self.pending() and time.perf_counter() - started < timeout:
            time.sleep(0.5)
        return time.perf_counter() - started

    # --- the checks -------------------------------------------------------------------

    def ledger_rows(self, payouts: data.Payouts) -> tuple[int, int, int]:
        """Transactions of failed payouts still ``payed_out``, transactions of other payouts
        released, and transfers whose status does not match their payout's."""
        ledger = self.db.execute(
            f"""SELECT count(*) FILTER (WHERE p.status = 'failed' AND t.payed_out),
                       count(*) FILTER (WHERE p.status <> 'failed' AND NOT t.payed_out),
                       count(*) FILTER (WHERE p.status = 'failed' AND tr.status <> 'failed'),
                       count(*) FILTER (WHERE p.status = 'paid' AND tr.status <> 'paid'),
                       count(*) FILTER (WHERE p.status IN ('pending', 'in_transit')
                                        AND tr.status <> 'pending')
                FROM {data.PAYOUT} p JOIN {data.ITEM} i ON i.payout_id = p.id
                JOIN {data.TRANSFER} tr ON tr.id = i.payment_transfer_id
                JOIN {data.TXN} t ON t.id = tr.payment_transaction_id
                WHERE p.id BETWEEN %s AND %s""", [payouts.first, payouts.last])[0]
        failed_still_paid_out, others_released, failed_wrong, paid_wrong, open_wrong = (
            int(v) for v in ledger)
        return failed_still_paid_out, others_released, failed_wrong + paid_wrong + open_wrong

    def check(self, result: dict[str, Any], owner: dict[str, str], payouts: data.Payouts,
              plan: list[list[Any]]) -> dict[str, Any]:
        acked = set(result["acked_ids"])
        stored_rows = self.db.execute(
            f"SELECT stripe_event_id, status FROM {data.EVENT} "
            "WHERE stripe_event_id LIKE 'evt_Soak%%'")
        stored = dict(stored_rows)
        status_counts = Counter(stored.values())
        not_stored = [e for e in acked if e not in stored]
        unsettled = [e for e in acked if stored.get(e) in ("received", "failed", "dead")]
        # Effects: each payout counts the events applied to it (events_applied, in the same
        # transaction as the event's status); the loader left it at 2.
        per_payout = self.db.execute(
            f"""SELECT p.stripe_payout_id, p.status, p.last_event_id, p.events_applied - 2,
                       (SELECT count(*) FROM {data.EVENT} e WHERE e.stripe_object_id =
                        p.stripe_payout_id AND e.status = 'processed')
                FROM {data.PAYOUT} p WHERE p.id BETWEEN %s AND %s""",
            [payouts.first, payouts.last])
        over = sum(max(0, counter - processed) for _, _, _, counter, processed in per_payout)
        under = sum(max(0, processed - counter) for _, _, _, counter, processed in per_payout)
        twice = int(self.db.scalar(
            f"""SELECT count(*) FROM (SELECT a.event_id FROM {data.ATTEMPT} a
                WHERE a.outcome = 'applied' GROUP BY a.event_id HAVING count(*) > 1) x"""))
        exactly_once = sum(processed for _, _, _, counter, processed in per_payout
                           if counter == processed)
        # The newest event of each payout decides its status.
        newest: dict[str, tuple[int, str, str]] = {}
        for event_id, event_type, payout_id, created, _account, _amount in plan:
            if payout_id not in newest or created > newest[payout_id][0]:
                newest[payout_id] = (created, event_id, event_type)
        status_of = dict(TYPES)
        wrong_state = [(p, s, last) for p, s, last, _, _ in per_payout
                       if s != status_of[newest[p][2]] or last != newest[p][1]]
        failed_still_paid_out, others_released, transfers_wrong = self.ledger_rows(payouts)
        errors = result.get("errors", {})
        figures = {
            "events": len(owner), "deliveries_planned": len(plan),
            "duplicates_planned": len(plan) - len(owner),
            "deliveries_sent": result["sent"],
            "not_acknowledged_then_resent": sum(v for k, v in errors.items() if k != "deadline"),
            "errors": errors, "http_status": result["http_status"],
            "acknowledged": len(acked), "never_acknowledged": len(result.get("unacked_ids", [])),
            "stored": len([e for e in acked if e in stored]),
            "stored_total": len(stored), "status": dict(status_counts),
            "applied": status_counts.get("processed", 0),
            "applied_exactly_once": exactly_once,
            "skipped": status_counts.get("skipped", 0),
            "lost": len(not_stored) + len(unsettled),
            "lost_not_stored": len(not_stored), "lost_unsettled": len(unsettled),
            "duplicated_effects": over + twice, "counter_over": over, "counter_under": under,
            "events_applied_twice": twice,
            "payouts": len(per_payout), "payouts_not_at_newest_event": len(wrong_state),
            "wrong_state_examples": [list(map(str, w)) for w in wrong_state[:5]],
            "failed_payout_transactions_still_paid_out": failed_still_paid_out,
            "other_payout_transactions_released": others_released,
            "transfers_wrong": transfers_wrong,
        }
        figures["invariants_hold"] = (
            figures["lost"] == 0 and figures["duplicated_effects"] == 0 and under == 0
            and figures["never_acknowledged"] == 0 and not wrong_state
            and failed_still_paid_out == 0 and others_released == 0
            and figures["transfers_wrong"] == 0 and len(acked) == len(owner)
            and status_counts.get("held", 0) == 0)
        return figures


def merged(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The load generators' results as one (what the checks read)."""
    if len(results) == 1:
        return results[0]
    out: dict[str, Any] = {"sent": 0, "acked_ids": [], "unacked_ids": [], "errors": Counter(),
                           "http_status": Counter()}
    for result in results:
        out["sent"] += result["sent"]
        out["acked_ids"] += result["acked_ids"]
        out["unacked_ids"] += result.get("unacked_ids", [])
        out["errors"].update(result.get("errors", {}))
        out["http_status"].update(result["http_status"])
    return {**out, "errors": dict(out["errors"]), "http_status": dict(out["http_status"])}


class PgBouncerSoak(Soak):
    """Scaled out (``--pgbouncer``, docs/deploy.md): two gunicorn nodes on their own ports,
    each sent half of the deliveries, and three workers, every connection through one
    PgBouncer in transaction pooling in front of the server; the server restarted
    half-way as in the plain soak (PgBouncer stays up and reconnects)."""

    nodes = 2
    workers = 3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bouncer: PgBouncer | None = None

    def app_env(self) -> dict[str, str]:
        from console.embedded_db import SUPERUSER
        from tests.pgbouncer import PgBouncer

        self.bouncer = PgBouncer("127.0.0.1", self.db.port, SUPERUSER).start()
        return child_env(self.bouncer.url(self.db.database), DATABASE_POOL_MODE="transaction",
                         **SOAK_ENV)

    def announce(self, plan: list[list[Any]], owner: dict[str, str],
                 payouts: data.Payouts) -> None:
        say(f"soak behind PgBouncer (transaction pooling): {self.events:,} events "
            f"({len(plan) - self.events:,} more as duplicates) for {payouts.count:,} payouts "
            f"at {self.rate:.0f}/s over {self.nodes} gunicorn nodes; deferred mode, "
            f"{self.workers} workers")

    def after_load(self, env: dict[str, str], result: dict[str, Any], owner: dict[str, str],
                   payouts: data.Payouts, plan: list[list[Any]]) -> dict[str, Any]:
        figures = super().after_load(env, result, owner, payouts, plan)
        assert self.bouncer is not None
        figures["pgbouncer"] = {"pools": [
            {k: str(v) for k, v in pool.items()} for pool in self.bouncer.admin("SHOW POOLS")
            if pool["database"] == self.db.database],
            "stats": [{k: str(v) for k, v in row.items()}
                      for row in self.bouncer.admin("SHOW STATS")
                      if row["database"] == self.db.database]}
        figures["nodes"], figures["workers"] = self.nodes, self.workers
        return figures

    def stop(self) -> None:
        super().stop()
        if self.bouncer is not None:
            self.bouncer.stop()


# --- Stripe as the source of truth (``--drop``) ---------------------------------------------

STRIPE_KEY = "sk_test_soak"
SYNC_TOTAL = re.compile(r"sync_events: (?P<accounts>\d+) account\(s\), listed (?P<listed>\d+), "
                        r"new (?P<new>\d+), applied (?P<applied>\d+), held (?P<held>\d+), "
                        r"waiting (?P<waiting>\d+)")
RECONCILE_TOTAL = re.compile(r"reconcile_payouts: checked (?P<checked>\d+), drifted "
                             r"(?P<drifted>\d+), missing at Stripe (?P<missing>\d+)"
                             r"(?:, applied (?P<applied>\d+), not applied (?P<not_applied>\d+))?"
                             r"(?:, errors (?P<errors>\d+))?")
DRIFT_LINE = re.compile(r"^(po_\w+) \(")
NOT_SETTLED = ("received", "failed", "dead")


def stripe_event(row: list[Any]) -> dict[str, Any]:
    """The event of a plan row exactly as the load generator delivers it."""
    return json.loads(build_body(*row))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class StripePlan:
    """What Stripe has, and what of it is delivered."""

    listed: list[list[Any]]  # the events the Events API lists (plan rows), oldest first
    dropped: frozenset[str]  # listed, never delivered
    silent: dict[str, list[Any]]  # payout -> its newest event, neither listed nor delivered
    newest: dict[str, list[Any]]  # payout -> its newest event: Stripe's payout is as it left it

    @property
    def delivered(self) -> set[str]:
        return {row[0] for row in self.listed} - self.dropped


def make_stripe_plan(payouts: data.Payouts, events: int, rng: random.Random, *,
                     drop_share: float, silent_share: float, duplicate_share: float,
                     reorder_window: int) -> tuple[list[list[Any]], StripePlan]:
    """``events`` distinct events for ``payouts`` as ``make_plan``. A share
    ``silent_share`` of the payouts (among those with two events or more) changed at
    Stripe silently: their newest event is neither listed nor delivered. Of the rest, a
    share ``drop_share`` is never delivered; what is delivered is reordered and
    duplicated as in ``make_plan``. Returns the deliveries and what Stripe has."""
    distinct = distinct_events(payouts, events)
    by_payout: dict[str, list[list[Any]]] = {}
    for row in distinct:
        by_payout.setdefault(row[2], []).append(row)
    newest = {po: max(rows, key=lambda r: r[3]) for po, rows in by_payout.items()}
    candidates = [po for po, rows in by_payout.items() if len(rows) >= 2]
    silent_ids = rng.sample(candidates, min(len(candidates),
                                            round(len(by_payout) * silent_share)))
    silent = {po: newest[po] for po in silent_ids}
    hidden = {row[0] for row in silent.values()}
    listed = sorted((row for row in distinct if row[0] not in hidden),
                    key=lambda r: (r[3], r[0]))
    dropped = frozenset(rng.sample([row[0] for row in listed], round(len(listed) * drop_share)))
    delivered = [row for row in distinct if row[0] not in hidden and row[0] not in dropped]
    plan = deliveries(delivered, rng, duplicate_share=duplicate_share,
                      reorder_window=reorder_window)
    return plan, StripePlan(listed, dropped, silent, newest)


class StripeSoak(Soak):
    """The soak with Stripe as the source of truth.

    A ``FakeStripe`` in this process holds each payout on its seller's account as its
    newest event left it, and lists the plan's events (``StripePlan.listed``); some are
    never delivered, and some payouts changed silently. After the load has settled:
    ``sync_events --days 1``, then ``reconcile_payouts --apply``, as the commands an
    operator runs, against the fake. Then every payout must be at Stripe's state, with
    the soak's other checks, and both commands run again must change nothing.
    """

    def __init__(self, events: int, rate: float, *, drop: float, silent: float,
                 restart_down_s: float, kill_every: tuple[float, float]) -> None:
        super().__init__(events, rate, restart_down_s=restart_down_s, kill_every=kill_every)
        self.drop = drop
        self.silent = silent
        self.stripe = StripePlan([], frozenset(), {}, {})
        self.fake: FakeStripe | None = None

    def make_plan(self, payouts: data.Payouts) -> tuple[list[list[Any]], dict[str, str]]:
        plan, self.stripe = make_stripe_plan(
            payouts, self.events, self.rng, drop_share=self.drop, silent_share=self.silent,
            duplicate_share=0.05, reorder_window=25)
        self.fake = self.start_stripe()
        owner = {row[0]: row[2] for row in self.stripe.listed if row[0] in self.stripe.delivered}
        return plan, owner

    def start_stripe(self) -> FakeStripe:
        """The fake Stripe: every payout as its newest event left it, on its seller's
        account, and the events Stripe lists, oldest first."""
        from tests.fakestripe import FakeStripe

        fake = FakeStripe()
        for row in self.stripe.newest.values():
            fake.add_payout(stripe_event(row)["data"]["object"], row[4], events=False)
        fake.events.extend((row[4], stripe_event(row)) for row in self.stripe.listed)
        return fake.start()

    def stop(self) -> None:
        try:
            if self.fake is not None:
                self.fake.stop()
        finally:
            super().stop()

    def announce(self, plan: list[list[Any]], owner: dict[str, str],
                 payouts: data.Payouts) -> None:
        assert self.fake is not None
        stripe = self.stripe
        say(f"soak (Stripe as the source of truth, {self.fake.url}): {self.events:,} events "
            f"for {payouts.count:,} payouts; {len(stripe.listed):,} listed by Stripe, of which "
            f"{len(stripe.dropped):,} never delivered; {len(stripe.silent):,} payouts changed "
            f"silently; {len(owner):,} delivered ({len(plan) - len(owner):,} more as "
            f"duplicates) at {self.rate:.0f}/s; deferred mode, 2 workers")

    def after_load(self, env: dict[str, str], result: dict[str, Any], owner: dict[str, str],
                   payouts: data.Payouts, plan: list[list[Any]]) -> dict[str, Any]:
        assert self.fake is not None
        stripe_env = {**env, "STRIPE_API_KEY": STRIPE_KEY, "STRIPE_API_BASE": self.fake.url,
                      "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        settle_timeout = max(60.0, self.events / 20)
        round_trip_ms = self.stripe_round_trip_ms()
        self.note(f"the fake Stripe answers a GET in {round_trip_ms:.1f} ms (median, kept alive)")
        runs: dict[str, dict[str, Any]] = {}
        runs["sync"] = self.command(stripe_env, "sync", "sync_events", "--days", "1")
        runs["sync"]["settled_after_s"] = self.wait_settled(settle_timeout)
        runs["reconcile"] = self.command(stripe_env, "reconcile", "reconcile_payouts", "--apply")
        runs["reconcile"]["settled_after_s"] = self.wait_settled(settle_timeout)
        figures = self.check_stripe(result, payouts)
        figures.update(self.check_ledger(env))
        before = self.snapshot(payouts)
        runs["sync_again"] = self.command(stripe_env, "sync_again", "sync_events", "--days", "1")
        runs["sync_again"]["settled_after_s"] = self.wait_settled(settle_timeout)
        runs["reconcile_again"] = self.command(stripe_env, "reconcile_again",
                                               "reconcile_payouts", "--apply")
        after = self.snapshot(payouts)
        figures["second_run_changes"] = (
            sum(a != b for a, b in zip(before["payouts"], after["payouts"], strict=True))
            + abs(after["events"] - before["events"]) + abs(after["attempts"] - before["attempts"]))
        for run in runs.values():
            run["waiting_on_stripe_s"] = round(run["stripe_requests"] * round_trip_ms / 1000, 1)
        figures["runs"] = runs
        figures["stripe_round_trip_ms"] = round(round_trip_ms, 2)
        figures["checks"] = checks = self.stripe_checks(figures)
        figures["failed_checks"] = [name for name, ok in checks.items() if not ok]
        figures["invariants_hold"] = all(checks.values())
        return figures

    def stripe_round_trip_ms(self, samples: int = 21) -> float:
        """How long the fake takes to answer ``GET /v1/payouts/{id}`` on a kept-alive
        connection (median): what each of the commands' requests costs besides their own
        work."""
        assert self.fake is not None
        payout, account = next(iter(self.fake.payout_accounts.items()))
        url = urlsplit(self.fake.url)
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
        times = []
        try:
            for _ in range(samples):
                started = time.perf_counter()
                conn.request("GET", f"/v1/payouts/{payout}", headers={
                    "Authorization": f"Bearer {STRIPE_KEY}", "Stripe-Account": account})
                conn.getresponse().read()
                times.append(time.perf_counter() - started)
        finally:
            conn.close()
        return 1000 * sorted(times)[len(times) // 2]

    def command(self, env: dict[str, str], name: str, *args: str) -> dict[str, Any]:
        """``manage.py args`` against the fake Stripe: exit code, duration, its totals,
        and the requests Stripe got (its output in ``var/bench/logs/soak-<name>.log``)."""
        assert self.fake is not None
        self.note(f"manage.py {' '.join(args)} ...")
        first_request = len(self.fake.requests)
        started = time.perf_counter()
        done = subprocess.run([PYTHON, "manage.py", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        seconds = time.perf_counter() - started
        (LOGS / f"soak-{name}.log").write_text(
            f"$ manage.py {' '.join(args)}\nexit {done.returncode} in {seconds:.1f} s\n"
            f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}")
        requests = self.fake.requests[first_request:]
        kinds = Counter(f"{r.method} " + ("/v1/payouts/{id}" if r.path.startswith("/v1/payouts/")
                                          else r.path) for r in requests)
        lines = done.stdout.splitlines()
        pattern = SYNC_TOTAL if args[0] == "sync_events" else RECONCILE_TOTAL
        found = next((m for m in map(pattern.search, lines) if m), None)
        totals = {k: int(v) for k, v in found.groupdict().items() if v is not None} if found else {}
        run = {
            "command": f"manage.py {' '.join(args)}", "exit": done.returncode,
            "seconds": round(seconds, 2), "totals": totals,
            "total_line": found.group(0) if found else "",
            "drifted_payouts": sorted(m.group(1) for m in map(DRIFT_LINE.match, lines) if m),
            "stripe_requests": len(requests), "stripe_requests_by_kind": dict(kinds),
            "stripe_errors": sum(r.status != 200 for r in requests),
            "accounts_asked": len({r.account or "" for r in requests}),
            "stderr_tail": done.stderr.splitlines()[-5:] if done.returncode not in (0, 1) else [],
        }
        self.note(f"  exit {done.returncode} in {seconds:.1f} s, {len(requests):,} Stripe "
                  f"requests: {run['total_line'] or done.stderr.strip()[-300:]}")
        return run

    def snapshot(self, payouts: data.Payouts) -> dict[str, Any]:
        """What a second run must not change."""
        rows = self.db.execute(
            f"""SELECT id, status, last_event_id, events_applied, arrival_date, failure_code,
                       review_reason FROM {data.PAYOUT} WHERE id BETWEEN %s AND %s ORDER BY id""",
            [payouts.first, payouts.last])
        return {"payouts": rows,
                "events": int(self.db.scalar(f"SELECT count(*) FROM {data.EVENT}")),
                "attempts": int(self.db.scalar(f"SELECT count(*) FROM {data.ATTEMPT}"))}

    def check_stripe(self, result: dict[str, Any], payouts: data.Payouts) -> dict[str, Any]:
        """After sync and reconcile: every event Stripe lists stored and settled, applied
        once at most, every payout at Stripe's state."""
        assert self.fake is not None
        stripe, fake = self.stripe, self.fake
        listed = {row[0] for row in stripe.listed}
        acked = set(result["acked_ids"])
        events = self.db.execute(f"SELECT stripe_event_id, status, source FROM {data.EVENT}")
        status_of = {e: status for e, status, _ in events}
        source_of = {e: source for e, _, source in events}
        not_stored = sorted(listed - status_of.keys())
        unsettled = sorted(e for e, status in status_of.items() if status in NOT_SETTLED)
        unexpected = sorted(e for e in status_of if e.startswith("evt_Soak") and e not in listed)
        per_payout = self.db.execute(
            f"""SELECT p.stripe_payout_id, p.status, p.last_event_id, p.events_applied - 2,
                       (SELECT count(*) FROM {data.EVENT} e WHERE e.stripe_object_id =
                        p.stripe_payout_id AND e.status = 'processed'),
                       p.amount, p.currency, p.arrival_date, p.failure_code, p.review_reason
                FROM {data.PAYOUT} p WHERE p.id BETWEEN %s AND %s""",
            [payouts.first, payouts.last])
        over = sum(max(0, counter - processed) for _, _, _, counter, processed, *_ in per_payout)
        under = sum(max(0, processed - counter) for _, _, _, counter, processed, *_ in per_payout)
        twice = int(self.db.scalar(
            f"""SELECT count(*) FROM (SELECT a.event_id FROM {data.ATTEMPT} a
                WHERE a.outcome = 'applied' GROUP BY a.event_id HAVING count(*) > 1) x"""))
        exactly_once = sum(processed for _, _, _, counter, processed, *_ in per_payout
                           if counter == processed)
        newest_listed: dict[str, str] = {}
        for row in stripe.listed:  # oldest first: the last one of a payout is its newest
            newest_listed[row[2]] = row[0]
        status_wrong: list[tuple[Any, ...]] = []
        fields_wrong: list[tuple[Any, ...]] = []
        event_wrong: list[tuple[Any, ...]] = []
        reviewed: list[tuple[Any, ...]] = []
        for po, status, last, _, _, amount, currency, arrival, failure_code, review in per_payout:
            theirs = fake.payouts[po]
            if status != theirs["status"]:
                status_wrong.append((po, status, theirs["status"]))
            ours = (amount, currency, int(arrival.timestamp()) if arrival else None,
                    failure_code or None)
            if ours != (theirs["amount"], theirs["currency"], theirs["arrival_date"],
                        theirs["failure_code"] or None):
                fields_wrong.append((po, *ours))
            if po in stripe.silent:  # only reconcile could bring it to Stripe's state
                if not last.startswith("resync_"):
                    event_wrong.append((po, last, "a resync event"))
            elif last != newest_listed.get(po):
                event_wrong.append((po, last, newest_listed.get(po)))
            if review:
                reviewed.append((po, review))
        failed_still_paid_out, others_released, transfers_wrong = self.ledger_rows(payouts)
        statuses = Counter(status_of.values())
        errors = result.get("errors", {})
        return {
            "events": len(listed) + len(stripe.silent), "events_listed": len(listed),
            "dropped": len(stripe.dropped), "silent_payouts": len(stripe.silent),
            "delivered_distinct": len(stripe.delivered),
            "deliveries_sent": result["sent"],
            "not_acknowledged_then_resent": sum(v for k, v in errors.items() if k != "deadline"),
            "errors": errors, "http_status": result["http_status"],
            "acknowledged": len(acked), "never_acknowledged": len(result.get("unacked_ids", [])),
            "acknowledged_not_delivered": len(acked - stripe.delivered),
            "stored_total": len(status_of), "status": dict(statuses),
            "stored_by_source": dict(Counter(source_of.values())),
            "recovered_by_sync": sum(source_of.get(e) == "events_api" for e in stripe.dropped),
            "synced_not_dropped": sum(source == "events_api" and e not in stripe.dropped
                                      for e, source in source_of.items()),
            "fixed_by_reconcile": sum(po in stripe.silent and last.startswith("resync_")
                                      and status == fake.payouts[po]["status"]
                                      for po, status, last, *_ in per_payout),
            "applied": statuses.get("processed", 0), "applied_exactly_once": exactly_once,
            "skipped": statuses.get("skipped", 0),
            "lost": len(not_stored) + len(unsettled),
            "lost_not_stored": len(not_stored), "lost_unsettled": len(unsettled),
            "lost_examples": (not_stored + unsettled)[:5],
            "stored_never_sent_or_listed": len(unexpected),
            "duplicated_effects": over + twice, "counter_over": over, "counter_under": under,
            "events_applied_twice": twice,
            "payouts": len(per_payout), "status_mismatches": len(status_wrong),
            "status_mismatch_examples": [list(map(str, w)) for w in status_wrong[:5]],
            "field_mismatches": len(fields_wrong),
            "field_mismatch_examples": [list(map(str, w)) for w in fields_wrong[:5]],
            "payouts_not_at_stripes_newest_event": len(event_wrong),
            "newest_event_examples": [list(map(str, w)) for w in event_wrong[:5]],
            "marked_for_review": len(reviewed),
            "review_examples": [list(map(str, w)) for w in reviewed[:5]],
            "failed_payout_transactions_still_paid_out": failed_still_paid_out,
            "other_payout_transactions_released": others_released,
            "transfers_wrong": transfers_wrong,
        }

    def stripe_checks(self, f: dict[str, Any]) -> dict[str, bool]:
        """Every check the run must pass, by name (the report lists those that failed)."""
        sync, reconcile = f["runs"]["sync"], f["runs"]["reconcile"]
        sync2, reconcile2 = f["runs"]["sync_again"], f["runs"]["reconcile_again"]
        silent = sorted(self.stripe.silent)
        return {
            "every delivered event acknowledged": (f["never_acknowledged"] == 0
                                                   and f["acknowledged"] == f["delivered_distinct"]
                                                   and f["acknowledged_not_delivered"] == 0),
            "lost 0": f["lost"] == 0,
            "nothing stored that Stripe neither listed nor sent": (
                f["stored_never_sent_or_listed"] == 0),
            "duplicated effects 0": f["duplicated_effects"] == 0 and f["counter_under"] == 0,
            "every payout at Stripe's status": f["status_mismatches"] == 0,
            "amount, currency, arrival, failure code as Stripe's": f["field_mismatches"] == 0,
            "every payout at Stripe's newest event (or a resync)": (
                f["payouts_not_at_stripes_newest_event"] == 0),
            "held 0": f["status"].get("held", 0) == 0,
            "marked for review 0": f["marked_for_review"] == 0,
            "ledger rows match the payouts": (
                f["failed_payout_transactions_still_paid_out"] == 0
                and f["other_payout_transactions_released"] == 0 and f["transfers_wrong"] == 0),
            "check_ledger exit 0": f["check_ledger_exit"] == 0,
            "sync_events exit 0": sync["exit"] == 0,
            "sync_events stored exactly the dropped events": (
                sync["totals"].get("new") == f["dropped"] == f["recovered_by_sync"]
                and f["synced_not_dropped"] == 0),
            "reconcile exit 1 (0 if no silent payouts)": reconcile["exit"] == (1 if silent else 0),
            "reconcile drifted exactly the silent payouts": reconcile["drifted_payouts"] == silent,
            "reconcile applied every drift": (
                reconcile["totals"].get("applied") == len(silent)
                and reconcile["totals"].get("not_applied") == 0
                and reconcile["totals"].get("missing") == 0
                and not reconcile["totals"].get("errors")),
            "sync_events again: exit 0, new 0": (sync2["exit"] == 0
                                                 and sync2["totals"].get("new") == 0),
            "reconcile again: exit 0, drifted 0": (reconcile2["exit"] == 0
                                                   and reconcile2["totals"].get("drifted") == 0),
            "second runs changed nothing": f["second_run_changes"] == 0,
        }


def report_stripe(figures: dict[str, Any]) -> str:
    def run_row(name: str) -> str:
        run = figures["runs"][name]
        return (f"exit {run['exit']}, {run['seconds']:.1f} s, {run['stripe_requests']:,} "
                f"requests (~{run['waiting_on_stripe_s']:.0f} s waiting on Stripe)")

    runs = figures["runs"]
    sync, reconcile = runs["sync"]["totals"], runs["reconcile"]["totals"]
    sync2, reconcile2 = runs["sync_again"]["totals"], runs["reconcile_again"]["totals"]
    rows = [
        ["events at Stripe (distinct)", f"{figures['events']:,}"],
        ["  listed by the Events API", f"{figures['events_listed']:,}"],
        ["  dropped: listed, never delivered", f"{figures['dropped']:,}"],
        ["payouts", f"{figures['payouts']:,}"],
        ["  changed at Stripe silently (event neither listed nor sent)",
         f"{figures['silent_payouts']:,}"],
        ["deliveries sent (with duplicates and resends)", f"{figures['deliveries_sent']:,}"],
        ["  of which failed during the restart/kills, then resent",
         f"{figures['not_acknowledged_then_resent']:,}"],
        ["acknowledged (distinct delivered)",
         f"{figures['acknowledged']:,} of {figures['delivered_distinct']:,}"],
        ["sync_events --days 1", run_row("sync")],
        ["  listed / new / applied / held / waiting",
         " / ".join(f"{sync.get(k, '?'):,}" if isinstance(sync.get(k), int) else "?"
                    for k in ("listed", "new", "applied", "held", "waiting"))],
        ["  recovered by sync (dropped events stored from the Events API)",
         f"{figures['recovered_by_sync']:,} of {figures['dropped']:,}"],
        ["reconcile_payouts --apply", run_row("reconcile")],
        ["  checked / drifted / applied",
         " / ".join(f"{reconcile.get(k, '?'):,}" if isinstance(reconcile.get(k), int) else "?"
                    for k in ("checked", "drifted", "applied"))],
        ["  fixed by reconcile (silent payouts at Stripe's state by a resync)",
         f"{figures['fixed_by_reconcile']:,} of {figures['silent_payouts']:,}"],
        ["stored events by source", ", ".join(f"{k} {v:,}" for k, v in
                                              sorted(figures["stored_by_source"].items()))],
        ["applied (processed) / applied exactly once",
         f"{figures['applied']:,} / {figures['applied_exactly_once']:,}"],
        ["lost (must be 0)", f"{figures['lost']:,}"],
        ["duplicated effects (must be 0)", f"{figures['duplicated_effects']:,}"],
        ["payouts not at Stripe's status (must be 0)",
         f"{figures['status_mismatches']:,} of {figures['payouts']:,}"],
        ["  amount/currency/arrival/failure code differing (must be 0)",
         f"{figures['field_mismatches']:,}"],
        ["  not at Stripe's newest event or a resync (must be 0)",
         f"{figures['payouts_not_at_stripes_newest_event']:,}"],
        ["held (must be 0) / marked for review (must be 0)",
         f"{figures['status'].get('held', 0):,} / {figures['marked_for_review']:,}"],
        ["ledger rows not matching their payout (must be 0)",
         f"{figures['failed_payout_transactions_still_paid_out']:,} / "
         f"{figures['other_payout_transactions_released']:,} / {figures['transfers_wrong']:,}"],
        ["check_ledger violations (must be 0)", f"{figures['ledger_violations']:,}"],
        ["sync_events again", run_row("sync_again")],
        ["  new (must be 0)", f"{sync2.get('new', '?')}"],
        ["reconcile_payouts --apply again", run_row("reconcile_again")],
        ["  drifted (must be 0)", f"{reconcile2.get('drifted', '?')}"],
        ["rows changed by the second runs (must be 0)", f"{figures['second_run_changes']:,}"],
        ["the fake Stripe's answer to a GET (median)",
         f"{figures['stripe_round_trip_ms']:.1f} ms"],
        ["workers killed (SIGKILL)", f"{figures['kills']:,}"],
        ["PostgreSQL restarted at", f"{figures['db_restart_at_s'] or 0:.0f} s into the load "
                                    f"({figures['db_down_s']:.0f} s down)"],
        ["settled after the load", f"{figures['settle_s']:.0f} s"],
        ["total", f"{figures['total_s']:.0f} s"],
        ["invariants", "HOLD" if figures["invariants_hold"] else "BROKEN"],
    ]
    text = table(rows, ["soak, Stripe as the source of truth", "value"])
    if figures["failed_checks"]:
        text += "\n\nfailed: " + "; ".join(figures["failed_checks"])
    return text


def report(figures: dict[str, Any]) -> str:
    rows = [
        ["events (distinct)", f"{figures['events']:,}"],
        ["deliveries sent (with duplicates and resends)", f"{figures['deliveries_sent']:,}"],
        ["  of which failed during the restart/kills, then resent",
         f"{figures['not_acknowledged_then_resent']:,}"],
        ["acknowledged", f"{figures['acknowledged']:,}"],
        ["stored", f"{figures['stored']:,}"],
        ["applied (processed)", f"{figures['applied']:,}"],
        ["applied exactly once", f"{figures['applied_exactly_once']:,}"],
        ["skipped (older or already final: reordering)", f"{figures['skipped']:,}"],
        ["lost (must be 0)", f"{figures['lost']:,}"],
        ["duplicated effects (must be 0)", f"{figures['duplicated_effects']:,}"],
        ["payouts not at their newest event (must be 0)",
         f"{figures['payouts_not_at_newest_event']:,} of {figures['payouts']:,}"],
        ["failed payouts' transactions still payed_out (must be 0)",
         f"{figures['failed_payout_transactions_still_paid_out']:,}"],
        ["other payouts' transactions released (must be 0)",
         f"{figures['other_payout_transactions_released']:,}"],
        ["transfers not matching their payout (must be 0)", f"{figures['transfers_wrong']:,}"],
        ["held (disagree with the ledger; must be 0)", f"{figures['status'].get('held', 0):,}"],
        ["check_ledger violations (must be 0)", f"{figures['ledger_violations']:,}"],
        ["workers killed (SIGKILL)", f"{figures['kills']:,}"],
        ["PostgreSQL restarted at", f"{figures['db_restart_at_s'] or 0:.0f} s into the load "
                                    f"({figures['db_down_s']:.0f} s down)"],
        ["settled after the load", f"{figures['settle_s']:.0f} s"],
        ["invariants", "HOLD" if figures["invariants_hold"] else "BROKEN"],
    ]
    if figures.get("nodes"):
        pool = (figures["pgbouncer"]["pools"] or [{}])[0]
        stats = (figures["pgbouncer"]["stats"] or [{}])[0]
        rows[:0] = [["topology", f"{figures['nodes']} gunicorn nodes, {figures['workers']} "
                                 "workers, PgBouncer in transaction pooling"],
                    ["PgBouncer at the end", f"{pool.get('cl_active', '?')} clients on "
                     f"{int(pool.get('sv_active', 0)) + int(pool.get('sv_idle', 0))} server "
                     f"connections; {int(stats.get('total_xact_count', 0)):,} transactions"]]
    return table(rows, ["soak", "value"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 000 events, faster")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None, help="events per second")
    parser.add_argument("--drop", type=float, default=None, metavar="SHARE",
                        help="Stripe as the source of truth (a fake Stripe): this share of the "
                             "events is never delivered; sync_events and reconcile_payouts "
                             "must recover everything (make soak-sync: 0.2); 3 000 events, "
                             "1 000 with --quick")
    parser.add_argument("--silent", type=float, default=0.02, metavar="SHARE",
                        help="with --drop: this share of the payouts changes at Stripe with no "
                             "event listed or delivered (default 0.02)")
    parser.add_argument("--pgbouncer", action="store_true",
                        help="scaled out: 2 gunicorn nodes and 3 workers, all through PgBouncer "
                             "in transaction pooling (make soak-pgbouncer; docs/deploy.md)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default var/bench/soak.json (soak-sync.json with --drop, "
                             "soak-pgbouncer.json with --pgbouncer)")
    args = parser.parse_args(argv)
    stripe = args.drop is not None
    if stripe and args.pgbouncer:
        parser.error("--pgbouncer and --drop are separate soaks: run one at a time")
    if stripe and not (0 <= args.drop < 1 and 0 <= args.silent < 1):
        parser.error("--drop and --silent are shares: 0 to below 1")
    events = args.events or (1_000 if args.quick else 3_000 if stripe else 10_000)
    rate = args.rate or (50.0 if args.quick else 60.0)
    out = args.out or VAR / ("soak-sync.json" if stripe
                             else "soak-pgbouncer.json" if args.pgbouncer else "soak.json")
    install_signal_handlers()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started_at = datetime.now(UTC)
    down_s = 2.0 if args.quick else 3.0
    kill_every = (1.5, 3.0) if args.quick else (2.0, 5.0)
    soak = (StripeSoak(events, rate, drop=args.drop, silent=args.silent, restart_down_s=down_s,
                       kill_every=kill_every) if stripe
            else (PgBouncerSoak if args.pgbouncer else Soak)(
                events, rate, restart_down_s=down_s, kill_every=kill_every))
    figures: dict[str, Any] = {}
    try:
        figures = soak.run()
    finally:
        soak.stop()
    figures.update({"date": started_at.isoformat(timespec="seconds"), "machine": machine(),
                    "drop": args.drop, "silent": args.silent if stripe else None})
    write_json(out, figures)
    say("\n" + (report_stripe if stripe else report)(figures))
    say(f"\nfigures in {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0 if figures.get("invariants_hold") else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
