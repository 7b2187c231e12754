"""Bulk data for the benchmarks, in SQL (``generate_series``), never through the ORM.

Every payout is shaped as ``create_payouts`` leaves one: its transactions paid out,
one transfer per transaction, one payout item per transfer. A payout ``id`` maps
to a Stripe id shaped like Stripe's (``stripe_payout_id``): Stripe's ids begin with
their creation time and the platform, so payouts made close in time share a long
prefix and are neighbours in the id's index (``po_1Pgc79B7WZ01zgkW`` then the payout
id, zero-padded). Events for them touch the same index pages, which is what
SERIALIZABLE's page-level predicate locks see. A transaction, its transfer and its payout item
share one id (``tr_B<id>`` for the transfer). Rows get explicit ids above the
largest one in use, and the identity sequences are moved past them afterwards,
so the ORM can keep inserting.

Columns a later migration adds (NOT NULL without a default) are filled with the
type's zero value, so a schema change in the product does not break the loaders.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from payouts import stripe_events

PAYOUT = "payouts_payout"
TXN = "payouts_paymenttransaction"
TRANSFER = "payouts_paymenttransfer"
ITEM = "payouts_payoutitem"
SELLER = "payouts_seller"
EVENT = "payouts_webhookevent"
ATTEMPT = "payouts_webhookeventattempt"
TXLOG = "payouts_transactionlog"
REJECTION = "payouts_webhookrejection"

PAYOUT_ID_PREFIX = "po_1Pgc79B7WZ01zgkW"  # time and platform, shared (module docstring)


def payout_id(pid: int) -> str:
    """The Stripe id of bench payout ``pid`` (see the module docstring)."""
    return f"{PAYOUT_ID_PREFIX}{pid:09d}"


def payout_id_sql(pid: str) -> str:
    """``payout_id`` as an SQL expression over the integer expression ``pid``."""
    return f"('{PAYOUT_ID_PREFIX}' || lpad(({pid})::text, 9, '0'))"


FAILURE_CODES = ["account_closed", "insufficient_funds", "no_account",
                 "invalid_account_number", "could_not_process", "bank_account_restricted"]

_ZERO = {"boolean": "false", "jsonb": "'{}'::jsonb", "json": "'{}'::json", "bytea": "''::bytea",
         "ARRAY": "'{}'", "timestamp with time zone": "now()", "date": "current_date"}


def _zero_for(data_type: str) -> str:
    if data_type in _ZERO:
        return _ZERO[data_type]
    if data_type in ("integer", "bigint", "smallint", "double precision", "numeric", "real"):
        return "0"
    return "''"


def insert_select(cur: Any, table: str, values: dict[str, str], source: str,
                  params: Any = None) -> int:
    """``INSERT INTO table (cols) SELECT exprs FROM source``; required columns that
    ``values`` does not name get their type's zero value."""
    cur.execute(
        """SELECT column_name, data_type FROM information_schema.columns
           WHERE table_name = %s AND is_nullable = 'NO' AND column_default IS NULL
             AND is_identity = 'NO'""", [table])
    columns = dict(values)
    for name, data_type in cur.fetchall():
        columns.setdefault(name, _zero_for(data_type))
    names = ", ".join(f'"{c}"' for c in columns)
    exprs = ",\n       ".join(columns.values())
    cur.execute(f"INSERT INTO {table} ({names})\nSELECT {exprs}\nFROM {source}", params)
    return int(cur.rowcount)


def next_id(cur: Any, table: str) -> int:
    cur.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}")
    return int(cur.fetchone()[0])


def sync_sequences(cur: Any) -> None:
    for table in (SELLER, PAYOUT, TXN, TRANSFER, ITEM, EVENT, ATTEMPT, TXLOG):
        cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"greatest((SELECT max(id) FROM {table}), 1))")


def ensure_sellers(cur: Any, count: int) -> tuple[int, int]:
    """``count`` bench sellers (acct_B<n>); returns their id range."""
    cur.execute(f"SELECT min(id), count(*) FROM {SELLER} "
                "WHERE stripe_account_id LIKE 'acct_B%%'")
    low, have = cur.fetchone()
    if have >= count:
        return int(low), int(low) + count - 1
    first = next_id(cur, SELLER)
    insert_select(cur, SELLER, {
        "id": "g", "name": "'Bench seller ' || lpad(g::text, 6, '0')",
        "stripe_account_id": "'acct_B' || g", "created_at": "now() - interval '400 days'",
    }, "generate_series(%s, %s) AS g", [first, first + count - have - 1])
    sync_sequences(cur)
    cur.execute(f"SELECT min(id) FROM {SELLER} WHERE stripe_account_id LIKE 'acct_B%%'")
    low = int(cur.fetchone()[0])
    return low, low + count - 1


@dataclass(frozen=True)
class Payouts:
    first: int  # payout ids first..last
    last: int
    items: int  # transactions (= transfers = items) per payout
    first_line: int  # the first transaction / transfer / item id
    sellers: tuple[int, int]  # the sellers' id range, as in ``load_payouts``

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def account_of(self, pid: int) -> str:
        """The connected account of payout ``pid``'s seller (``ensure_sellers``' ids); the
        Python twin of ``seller_sql``."""
        low, high = self.sellers
        return f"acct_B{low + pid % (high - low + 1)}"

    def amount_of(self, pid: int) -> int:
        """The Python twin of ``amount_sql``."""
        return self.items * (1000 + pid % 5000)

    def event(self, event_id: str, event_type: str, pid: int, created: int) -> list[Any]:
        """A load plan row for payout ``pid``: its event agrees with the ledger (account,
        amount, currency), as Stripe's do; see ``bench.load``."""
        return [event_id, event_type, payout_id(pid), created, self.account_of(pid),
                self.amount_of(pid)]

    def lines_of(self, payout_id: int) -> range:
        start = self.first_line + (payout_id - self.first) * self.items
        return range(start, start + self.items)


def seller_sql(sellers: tuple[int, int], pid: str) -> str:
    """The seller id of bench payout ``pid`` (an SQL expression)."""
    return f"{sellers[0]} + mod({pid}, {sellers[1] - sellers[0] + 1})"


def amount_sql(items: int, pid: str) -> str:
    """The amount of bench payout ``pid`` (an SQL expression): its transactions' sum."""
    return f"{items} * (1000 + mod({pid}, 5000))"


def load_payouts(cur: Any, count: int, *, items: int, sellers: tuple[int, int],
                 status: str = "in_transit", status_sql: str | None = None,
                 age_days: float = 0.0, spread_days: float = 0.0, first: int | None = None,
                 first_line: int | None = None, parallel_url: str | None = None) -> Payouts:
    """``count`` payouts with ``items`` transactions each, as ``create_payouts`` leaves
    them and as their ``payout.created`` and ``payout.updated`` events left them
    (``events_applied`` = 2, ``last_event_created`` = creation + 1 h).

    ``status_sql`` (an SQL expression of ``g``, the payout id) overrides ``status`` to
    mix statuses; failed payouts get a failure code, released transactions and failed
    transfers, as the processor leaves them. Payouts are created ``age_days`` ago,
    spread over ``spread_days`` before that. ``first`` / ``first_line`` fix the ids
    (default: above the largest in use). With ``parallel_url`` the four tables load
    over two connections at once (referential checks off, as for any bulk load).
    """
    if first is None:
        first = next_id(cur, PAYOUT)
    if first_line is None:
        first_line = max(next_id(cur, TXN), next_id(cur, TRANSFER), next_id(cur, ITEM))
    last = first + count - 1
    status_expr = status_sql or f"'{status}'"
    created = (f"now() - interval '{age_days} days' "
               f"- ((g - {first}) * interval '{spread_days * 86400 / max(count, 1)} seconds')")
    stage = f"bench_stage_{first}"
    cur.execute(f"DROP TABLE IF EXISTS {stage}")
    cur.execute(f"CREATE UNLOGGED TABLE {stage} "
                "(id bigint PRIMARY KEY, status text, created timestamptz)")
    cur.execute(f"""INSERT INTO {stage}
                    SELECT g, {status_expr}, {created} FROM generate_series(%s, %s) AS g""",
                [first, last])
    cur.execute(f"ANALYZE {stage}")
    lines = f"""(SELECT l AS id, p.id AS payout_id, p.status, p.created
                FROM generate_series(%s, %s) AS l
                JOIN {stage} AS p ON p.id = {first} + (l - {first_line}) / {items}) AS x"""
    line_range = [first_line, first_line + count * items - 1]

    def payouts_job(c: Any) -> None:
        insert_select(c, PAYOUT, {
            "id": "p.id",
            "seller_id": seller_sql(sellers, "p.id"),
            "stripe_payout_id": payout_id_sql("p.id"),
            "amount": amount_sql(items, "p.id"),
            "currency": "'usd'",
            "status": "p.status",
            "arrival_date": "p.created + interval '2 days'",
            "failure_code": f"""CASE WHEN p.status = 'failed' THEN
                   (ARRAY{FAILURE_CODES!r})[1 + mod(p.id, {len(FAILURE_CODES)})] ELSE '' END""",
            "failure_message": """CASE WHEN p.status = 'failed' THEN 'The bank refused it.'
                                  ELSE '' END""",
            "metadata": "'{}'::jsonb",
            "last_event_id": "'evt_Bu' || p.id",
            "last_event_type": "'payout.updated'",
            "last_event_created": "p.created + interval '1 hour'",
            "events_applied": "2",
            "created_at": "p.created",
            "updated_at": "p.created + interval '1 hour'",
            "creation_state": "''",
            "creation_error": "''",
        }, f"{stage} AS p")

    def transactions_job(c: Any) -> None:
        insert_select(c, TXN, {
            "id": "x.id",
            "seller_id": seller_sql(sellers, "x.payout_id"),
            "amount": "1000 + mod(x.payout_id, 5000)",
            "currency": "'usd'",
            "release_date": "(x.created - interval '3 days')::date",
            "payed_out": "x.status <> 'failed'",
            "actual_release_date": "CASE WHEN x.status <> 'failed' THEN x.created END",
            "created_at": "x.created - interval '10 days'",
        }, lines, line_range)

    def transfers_job(c: Any) -> None:
        insert_select(c, TRANSFER, {
            "id": "x.id",
            "payment_transaction_id": "x.id",
            "stripe_transfer_id": "'tr_B' || x.id",
            "amount": "1000 + mod(x.payout_id, 5000)",
            "status": """CASE x.status WHEN 'paid' THEN 'paid' WHEN 'failed' THEN 'failed'
                     ELSE 'pending' END""",
            "updated_at": "x.created",
        }, lines, line_range)

    def items_job(c: Any) -> None:
        insert_select(c, ITEM, {"id": "x.id", "payout_id": "x.payout_id",
                                "payment_transfer_id": "x.id"}, lines, line_range)

    jobs = [transactions_job, transfers_job, payouts_job, items_job]
    if parallel_url and count * items >= 100_000:
        run_parallel(parallel_url, jobs)
    else:
        for job in jobs:
            job(cur)
    cur.execute(f"DROP TABLE {stage}")
    sync_sequences(cur)
    return Payouts(first, last, items, first_line, sellers)


# --- events ---------------------------------------------------------------------------

_PO, _EVT, _ACCT = "po_PLACEHOLDER", "evt_PLACEHOLDER", "acct_PLACEHOLDER"
_CREATED, _ARRIVAL, _AMOUNT = 1111111111, 1222222222, 987654321


def body_template(event_type: str) -> str:
    """A Stripe event body (as Stripe sends it) with placeholders for SQL ``replace``."""
    status = stripe_events.TYPICAL_STATUS[event_type]
    extra = stripe_events.failed_payout_defaults() if status == "failed" else {}
    obj = stripe_events.payout_object(_PO, status=status, created=_CREATED, amount=_AMOUNT,
                                      arrival_date=_ARRIVAL, **extra)
    event = stripe_events.payout_event(event_type, obj, account=_ACCT, created=_CREATED,
                                       event_id=_EVT)
    return stripe_events.encode(event).decode()


def load_events(cur: Any, *, payouts: Payouts, event_type: str, status: str,
                id_prefix: str, per_payout: int = 1, age_days: float = 0.0,
                spread_days: float = 0.0, first_payout: int | None = None,
                count: int | None = None, status_sql: str | None = None,
                attempts: int = 1, error: str = "") -> tuple[int, int]:
    """``count`` stored events (default: ``per_payout`` for each payout), received
    ``age_days`` ago (spread over ``spread_days``), with real bodies; the event with id
    ``e`` belongs to payout ``first_payout + (e - first) // per_payout``. Returns the id
    range."""
    first = next_id(cur, EVENT)
    first_payout = payouts.first if first_payout is None else first_payout
    count = count if count is not None else (payouts.last - first_payout + 1) * per_payout
    last = first + count - 1
    template = body_template(event_type)
    received = (f"now() - interval '{age_days} days' "
                f"- ((x.id - {first}) * interval '{spread_days * 86400 / max(count, 1)} seconds')")
    source = f"""(SELECT e AS id, {first_payout} + (e - {first}) / {per_payout} AS payout_id
                  FROM generate_series(%s, %s) AS e) AS x"""
    status_expr = status_sql or f"'{status}'"
    pending = f"({status_expr}) IN ('received', 'failed')"
    # The events agree with their payouts (account, amount), as Stripe's do.
    account = f"'acct_B' || ({seller_sql(payouts.sellers, 'x.payout_id')})"
    insert_select(cur, EVENT, {
        "id": "x.id",
        "stripe_event_id": f"'{id_prefix}' || x.id",
        "type": f"'{event_type}'",
        "account": account,
        "livemode": "false",
        "api_version": f"'{stripe_events.API_VERSION}'",
        "stripe_created": f"to_timestamp(floor(extract(epoch FROM {received})))",
        "stripe_object_id": payout_id_sql("x.payout_id"),
        "raw_body": f"""convert_to(replace(replace(replace(replace(replace(replace(%s,
                        '{_PO}', {payout_id_sql("x.payout_id")}), '{_EVT}', '{id_prefix}' || x.id),
                        '{_ACCT}', {account}),
                        '{_AMOUNT}', ({amount_sql(payouts.items, "x.payout_id")})::text),
                        '{_CREATED}', floor(extract(epoch FROM {received}))::bigint::text),
                        '{_ARRIVAL}',
                        (floor(extract(epoch FROM {received}))::bigint + 172800)::text),
                        'UTF8')""",
        "headers": "'{\"content-type\": \"application/json; charset=utf-8\"}'::jsonb",
        "received_at": received,
        "status": status_expr,
        "status_reason": f"CASE WHEN ({status_expr}) = 'processed' THEN 'in_transit → paid' "
                         f"ELSE '' END",
        "attempts": str(attempts),
        "next_attempt_at": f"CASE WHEN {pending} THEN {received} + interval '1 minute' END",
        "last_error": f"CASE WHEN {pending} THEN '{error}' ELSE '' END",
        "processed_at": f"CASE WHEN NOT {pending} THEN {received} + interval '80 milliseconds' END",
    }, source, [template, first, last])
    sync_sequences(cur)
    return first, last


def load_history(cur: Any, events: tuple[int, int], *, payouts_first: int, per_payout: int) -> None:
    """For stored events, the attempt and the TransactionLog row the processor wrote."""
    first, last = events
    insert_select(cur, ATTEMPT, {
        "event_id": "e.id", "trigger": "'inline'", "worker": "''",
        "started_at": "e.received_at + interval '2 milliseconds'",
        "finished_at": "e.received_at + interval '40 milliseconds'",
        "outcome": """CASE e.status WHEN 'processed' THEN 'applied' WHEN 'skipped' THEN 'skipped'
                      WHEN 'ignored' THEN 'ignored' ELSE 'retry' END""",
        "reason": "e.status_reason", "error": "e.last_error", "traceback": "''",
        "status_after": "e.status", "requested_by_id": "NULL",
    }, f"{EVENT} AS e WHERE e.id BETWEEN %s AND %s", [first, last])
    insert_select(cur, TXLOG, {
        "operation": "'webhook.process_event'", "isolation_level": "'serializable'",
        "read_only": "false",
        "attempts": "CASE WHEN mod(e.id, 50) = 0 THEN 2 ELSE 1 END",
        "sqlstates": "CASE WHEN mod(e.id, 50) = 0 THEN ARRAY['40001']::varchar(5)[] "
                     "ELSE ARRAY[]::varchar(5)[] END",
        "duration_ms": "5 + mod(e.id, 97) / 4.0",
        "outcome": "'committed'", "error": "''",
        "started_at": "e.received_at + interval '2 milliseconds'",
        "context": "'{}'::jsonb", "event_id": "e.id",
        "payout_id": f"{payouts_first} + (e.id - {first}) / {per_payout}",
    }, f"{EVENT} AS e WHERE e.id BETWEEN %s AND %s", [first, last])
    sync_sequences(cur)


def load_old_transaction_logs(cur: Any, count: int, *, age_days: int) -> None:
    """``count`` transaction logs from ``age_days`` ago, one a millisecond: what
    ``manage.py prune`` deletes (the bench's prune section)."""
    insert_select(cur, TXLOG, {
        "operation": "'webhook.process_event'", "isolation_level": "'serializable'",
        "read_only": "false", "attempts": "1", "sqlstates": "ARRAY[]::varchar(5)[]",
        "duration_ms": "5 + mod(g, 97) / 4.0", "outcome": "'committed'", "error": "''",
        "started_at": "now() - make_interval(days => %s) + g * interval '1 millisecond'",
        "context": "'{}'::jsonb", "event_id": "NULL", "payout_id": "NULL",
    }, "generate_series(1, %s) AS g", [age_days, count])
    sync_sequences(cur)
    cur.execute(f"VACUUM (ANALYZE) {TXLOG}")
    cur.execute("CHECKPOINT")  # the load's dirty pages written now, not while measuring


def analyze(cur: Any) -> None:
    for table in (SELLER, PAYOUT, TXN, TRANSFER, ITEM, EVENT, ATTEMPT, TXLOG):
        cur.execute(f"VACUUM (ANALYZE) {table}")


def connect_loader(url: str) -> Any:
    """A connection for bulk loads: autocommit, foreign-key triggers off (the loaders
    build consistent rows; checking 5 million references one by one is the slow part)."""
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
    return conn


def run_parallel(url: str, jobs: list[Any], workers: int = 2) -> None:
    """Run ``job(cursor)`` for each job over ``workers`` connections at once."""
    from concurrent.futures import ThreadPoolExecutor

    def run(chunk: list[Any]) -> None:
        conn = connect_loader(url)
        try:
            with conn.cursor() as cur:
                for job in chunk:
                    job(cur)
        finally:
            conn.close()

    chunks = [jobs[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run, chunk) for chunk in chunks if chunk]:
            future.result()


class Timer:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def s(self) -> float:
        return time.perf_counter() - self.started


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
