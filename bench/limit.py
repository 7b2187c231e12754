"""The physical limit: pgbench replaying the SQL the processor issues for ``payout.paid``.

The statements are captured at run time from the product's own code (one
``payout.paid`` delivery received by ``processing.event_receive`` exactly as the
webhook view does in inline mode, inside ``CaptureQueriesContext``), so the
replay follows the product as it changes. Two scripts are written next to the
results:

* ``pgbench_payout_paid.sql`` (the limit): the processor's one SERIALIZABLE
  transaction, ``BEGIN ISOLATION LEVEL SERIALIZABLE`` … ``COMMIT``, on a random
  payout, storing a new event each time.
* ``pgbench_request.sql``: every statement one delivery costs, in the order and
  round trips the product sends them (health check, duplicate check, BEGIN,
  SET/SHOW, the transaction with its TransactionLog row, COMMIT).

``NOWAIT`` is dropped from row locks: pgbench cannot survive a 55P03 (it would drop
the client), and the product answers one by leaving the event to a worker.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import data
from bench.common import VAR, pg_bin

CAPTURE_PAYOUT = 900000001
CAPTURE_EVENT = 900000101
CAPTURE_EVENT_ID = "evt_BenchCapture0000000001"
SCRIPT = VAR / "pgbench_payout_paid.sql"
REQUEST_SCRIPT = VAR / "pgbench_request.sql"


@dataclass
class Captured:
    request: list[str]  # every statement of the delivery, in order
    transaction: list[str]  # BEGIN … COMMIT of the processor
    outcome: str


def capture(cur: Any, sellers: tuple[int, int]) -> Captured:
    """Store and process one payout.paid through the product's code; return its SQL.
    ``cur`` is a psycopg2 cursor (autocommit) on the bench database; the capture rows
    are removed afterwards."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from payouts import stripe_events
    from payouts.services.processing import event_receive

    payouts = data.load_payouts(cur, 1, items=3, sellers=sellers, age_days=2,
                                first=CAPTURE_PAYOUT, first_line=CAPTURE_PAYOUT)
    cur.execute(f"SELECT setval(pg_get_serial_sequence('{data.EVENT}', 'id'), %s)",
                [CAPTURE_EVENT - 1])
    obj = stripe_events.payout_object(data.payout_id(CAPTURE_PAYOUT), status="paid",
                                      amount=payouts.amount_of(CAPTURE_PAYOUT))
    event = stripe_events.payout_event("payout.paid", obj, event_id=CAPTURE_EVENT_ID,
                                       account=payouts.account_of(CAPTURE_PAYOUT))
    body = stripe_events.encode(event)
    headers = {"content-type": "application/json; charset=utf-8",
               "user-agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
               "stripe-signature": f"t={int(time.time())},v1=…"}
    try:
        with CaptureQueriesContext(connection) as queries:
            received = event_receive(event, body, headers)
        statements = [" ".join(q["sql"].split()) for q in queries.captured_queries]
        outcome = received.outcome
        if received.event_id != CAPTURE_EVENT or outcome is None or outcome.kind != "applied":
            raise RuntimeError(f"the captured payout.paid was not applied inline: {received}")
    finally:
        connection.close()
        _remove_capture_rows(cur)
    # Django logs BEGIN and COMMIT among the queries (since 4.2).
    begin, commit_at = statements.index("BEGIN"), statements.index("COMMIT")
    return Captured(statements, statements[begin:commit_at + 1], str(outcome.kind))


def _remove_capture_rows(cur: Any) -> None:
    cur.execute(f"DELETE FROM {data.ATTEMPT} WHERE event_id = %s", [CAPTURE_EVENT])
    cur.execute(f"DELETE FROM {data.TXLOG} WHERE event_id = %s OR payout_id = %s",
                [CAPTURE_EVENT, CAPTURE_PAYOUT])
    cur.execute(f"DELETE FROM {data.EVENT} WHERE id = %s", [CAPTURE_EVENT])
    cur.execute(f"DELETE FROM {data.ITEM} WHERE payout_id = %s", [CAPTURE_PAYOUT])
    cur.execute(f"DELETE FROM {data.TRANSFER} WHERE id BETWEEN %s AND %s",
                [CAPTURE_PAYOUT, CAPTURE_PAYOUT + 10])
    cur.execute(f"DELETE FROM {data.TXN} WHERE id BETWEEN %s AND %s",
                [CAPTURE_PAYOUT, CAPTURE_PAYOUT + 10])
    cur.execute(f"DELETE FROM {data.PAYOUT} WHERE id = %s", [CAPTURE_PAYOUT])
    data.sync_sequences(cur)


def _templated(statement: str) -> str:
    """The captured statement with the payout and event made pgbench variables."""
    text = statement.replace(f"'{data.payout_id(CAPTURE_PAYOUT)}'", data.payout_id_sql(":pid"))
    # A new Stripe event id each run. pgbench repeats its random numbers when it retries
    # a run, which is right: the failed run's event was rolled back with it.
    text = text.replace(f"'{CAPTURE_EVENT_ID}'", "('evt_P' || :evt)")
    text = re.sub(rf"\b{CAPTURE_EVENT}\b", ":new_event_id", text)
    text = re.sub(rf"\b{CAPTURE_PAYOUT}\b", ":pid", text)
    text = re.sub(r"\s+NOWAIT\b", "", text)
    return _one_round_trip(text)


def _one_round_trip(sql: str) -> str:
    r"""Semicolons outside string literals become ``\;``: pgbench then sends a
    multi-statement query (``SET TRANSACTION …; SHOW …``) as one, as psycopg2 does."""
    out, quoted = [], False
    for char in sql:
        if char == "'":
            quoted = not quoted
        out.append("\\;" if char == ";" and not quoted else char)
    return "".join(out).rstrip("\\;").rstrip()


def write_scripts(captured: Captured) -> tuple[Path, Path]:
    """The limit script and the whole-request script (see the module docstring)."""
    header = [
        "-- Generated by bench/limit.py from the SQL the product issued for one payout.paid.",
        "-- pid: a random payout of the limit set; each run stores a new event for it.",
        r"\set pid random(:pid_lo, :pid_hi)",
        r"\set evt random(1, 1000000000000)",
    ]
    body = [s for s in captured.transaction
            if not s.upper().startswith(("BEGIN", "SET TRANSACTION", "COMMIT"))]
    limit = [*header, "BEGIN ISOLATION LEVEL SERIALIZABLE;", *_script_lines(body), "COMMIT;"]
    SCRIPT.parent.mkdir(parents=True, exist_ok=True)
    SCRIPT.write_text("\n".join(limit) + "\n")
    request = [*header,
               "-- Django's connection health check (CONN_HEALTH_CHECKS) at request start",
               "SELECT 1;", *_script_lines(captured.request)]
    REQUEST_SCRIPT.write_text("\n".join(request) + "\n")
    return SCRIPT, REQUEST_SCRIPT


def _script_lines(statements: list[str]) -> list[str]:
    """pgbench lines; the stored event's id, as RETURNING gives it, becomes
    ``:new_event_id`` for the statements after it (the TransactionLog row)."""
    lines = []
    for statement in statements:
        line = _templated(statement)
        if statement.rstrip().upper().endswith("RETURNING EVENT_ID"):
            lines.append(line + r" \gset new_")
        else:
            lines.append(line + ";")
    return lines


SERIALIZABLE_SET = r"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE\; SHOW transaction_isolation;"


def what_if_scripts(script: Path, request_script: Path) -> dict[str, Path]:
    """Variants of the two scripts (``--what-if``): the same statements at READ
    COMMITTED, to show what SERIALIZABLE costs here."""
    variants = {
        "processor_tx_read_committed": script.read_text().replace(
            "BEGIN ISOLATION LEVEL SERIALIZABLE;", "BEGIN ISOLATION LEVEL READ COMMITTED;"),
        "request_read_committed": request_script.read_text().replace(
            SERIALIZABLE_SET, SERIALIZABLE_SET.replace("SERIALIZABLE", "READ COMMITTED")),
    }
    paths = {}
    for name, text in variants.items():
        path = VAR / f"pgbench_what_if_{name}.sql"
        path.write_text(text)
        paths[name] = path
    return paths


_FIGURES = {
    "tps": r"^tps = ([\d.]+)",
    "transactions": r"number of transactions actually processed: (\d+)",
    "failed": r"number of failed transactions: (\d+)",
    "retried": r"number of transactions retried: (\d+)",
    "retries": r"total number of retries: (\d+)",
    "latency_ms": r"latency average = ([\d.]+) ms",
    "serialization_failures": r"number of serialization failures: (\d+)",
}


def pgbench(url: str, script: Path, *, clients: int, seconds: int, variables: dict[str, int],
            max_tries: int) -> dict[str, Any]:
    argv = [str(pg_bin() / "pgbench"), "-n", "-M", "simple", "-c", str(clients), "-j", "2",
            "-T", str(seconds), f"--max-tries={max_tries}", "--failures-detailed",
            "-f", str(script)]
    for name, value in variables.items():
        argv += ["-D", f"{name}={value}"]
    argv.append(url)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120,
                            check=False)
    out = result.stdout
    figures: dict[str, Any] = {"exit_code": result.returncode, "clients": clients,
                               "seconds": seconds, "max_tries": max_tries,
                               "script": str(script.relative_to(VAR.parent.parent))}
    for name, pattern in _FIGURES.items():
        match = re.search(pattern, out, re.MULTILINE)
        value = float(match.group(1)) if match else None
        figures[name] = value if value is None or name in ("tps", "latency_ms") else int(value)
    if result.returncode != 0 or figures["tps"] is None:
        figures["error"] = (result.stderr or out)[-2000:]
    return figures
