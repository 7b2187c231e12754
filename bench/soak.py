"""``python -m bench.soak [--quick] [--events N] [--rate R]``: nothing acknowledged is lost.

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

Runs on its own embedded PostgreSQL (``var/bench/soak``), created fresh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    base = int(time.time()) - 3600
    distinct: list[list[Any]] = []
    for pid in range(payouts.first, payouts.last + 1):
        for n in range(steps_of(pid)):
            event_type, _status = TYPES[n]
            distinct.append(payouts.event(f"evt_Soak{pid}n{n}", event_type, pid, base + n * 60))
    distinct = distinct[:events]
    plan = list(distinct)
    for i in range(len(plan)):  # reorder: swap with a near neighbour
        j = min(len(plan) - 1, max(0, i + rng.randint(-reorder_window, reorder_window)))
        plan[i], plan[j] = plan[j], plan[i]
    for row in rng.sample(distinct, int(len(distinct) * duplicate_share)):
        plan.insert(min(len(plan), plan.index(row) + rng.randint(1, 200)), list(row))
    owner = {row[0]: row[2] for row in distinct}
    return plan, owner


class Soak:
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

    def note(self, text: str) -> None:
        say(f"   [{time.strftime('%H:%M:%S')}] {text}")
        self.log.append(text)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.db.start(fresh=True)
        env = child_env(self.db.url, **SOAK_ENV)
        manage(env, "migrate", "--noinput")
        conn = data.connect_loader(self.db.url)
        with conn.cursor() as cur:
            sellers = data.ensure_sellers(cur, 100)
            n_payouts = payouts_needed(data.next_id(cur, data.PAYOUT), self.events)
            payouts = data.load_payouts(cur, n_payouts, items=3, sellers=sellers,
                                        status="pending", age_days=1)
            plan, owner = make_plan(payouts, self.events, self.rng, duplicate_share=0.05,
                                    reorder_window=25)
            data.analyze(cur)
        conn.close()
        say(f"soak: {self.events:,} events ({len(plan) - self.events:,} more as duplicates) for "
            f"{n_payouts:,} payouts at {self.rate:.0f}/s; deferred mode, 2 workers")

        port = free_port()
        server = self.procs.start("soak-gunicorn", gunicorn_argv(
            port, workers=2, threads=8, worker_class="gthread"), env)
        wait_http(port, process=server)
        for i in range(2):
            self.start_worker(i, env)

        folder = VAR / "load"
        folder.mkdir(parents=True, exist_ok=True)
        plan_path, spec_path, out_path = (folder / f"soak.{k}.json"
                                          for k in ("plan", "spec", "result"))
        plan_path.write_text(json.dumps(plan))
        load_s = len(plan) / self.rate
        spec_path.write_text(json.dumps({
            "port": port, "secret": SECRET, "plan": str(plan_path), "connections": 32,
            "rate": self.rate, "max_seconds": load_s * 2 + 120, "resend": True,
            "sample_every": 1}))
        out_path.unlink(missing_ok=True)
        load = self.procs.start("soak-load", [PYTHON, "-m", "bench.load", str(spec_path),
                                              str(out_path)], env)
        load_started = time.perf_counter()
        restart_at = load_started + load_s / 2
        next_kill = load_started + self.rng.uniform(*self.kill_every)
        victim = 0
        while load.poll() is None:
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
                victim = 1 - victim
                next_kill = now + self.rng.uniform(*self.kill_every)
            time.sleep(0.05)
        self.note(f"load done in {time.perf_counter() - load_started:.0f} s; "
                  f"{self.kills} workers killed; waiting for the workers to settle everything")
        self.procs.stop("soak-load")
        if not out_path.exists():
            raise RuntimeError(f"the load generator wrote no result; see {LOGS}")
        result = json.loads(out_path.read_text())
        settled_s = self.wait_settled(timeout=max(120.0, self.events / 20))
        self.note(f"settled {settled_s:.0f} s after the load")
        figures = self.check(result, owner, payouts, plan)
        figures.update(self.check_ledger(env))
        figures["invariants_hold"] = (figures["invariants_hold"]
                                      and figures["check_ledger_exit"] == 0)
        figures.update({"kills": self.kills, "db_restart_at_s": self.restarted_at,
                        "db_down_s": self.restart_down_s, "settle_s": settled_s,
                        "rate": self.rate, "total_s": time.perf_counter() - started,
                        "notes": self.log})
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
        failed_still_paid_out, others_released, failed_transfers_wrong, \
            paid_transfers_wrong, open_transfers_wrong = (int(v) for v in ledger)
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
            "transfers_wrong": failed_transfers_wrong + paid_transfers_wrong
            + open_transfers_wrong,
        }
        figures["invariants_hold"] = (
            figures["lost"] == 0 and figures["duplicated_effects"] == 0 and under == 0
            and figures["never_acknowledged"] == 0 and not wrong_state
            and failed_still_paid_out == 0 and others_released == 0
            and figures["transfers_wrong"] == 0 and len(acked) == len(owner)
            and status_counts.get("held", 0) == 0)
        return figures


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
    return table(rows, ["soak", "value"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 000 events, faster")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None, help="events per second")
    parser.add_argument("--out", type=Path, default=VAR / "soak.json")
    args = parser.parse_args(argv)
    events = args.events or (1_000 if args.quick else 10_000)
    rate = args.rate or (50.0 if args.quick else 60.0)
    install_signal_handlers()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started_at = datetime.now(UTC)
    soak = Soak(events, rate, restart_down_s=2.0 if args.quick else 3.0,
                kill_every=(1.5, 3.0) if args.quick else (2.0, 5.0))
    figures: dict[str, Any] = {}
    try:
        figures = soak.run()
    finally:
        soak.procs.stop_all()
        with contextlib.suppress(Exception):
            soak.db.remove()
    figures.update({"date": started_at.isoformat(timespec="seconds"), "machine": machine()})
    write_json(args.out, figures)
    say("\n" + report(figures))
    say(f"\nfigures in {args.out.relative_to(REPO)}")
    return 0 if figures.get("invariants_hold") else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
