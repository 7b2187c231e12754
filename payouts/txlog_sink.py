"""Stores each txutils TransactionRecord as a TransactionLog row.

Added as a before-commit sink (payouts/apps.py): a committed transaction's row is
written inside it, so a delivery costs one commit. A transaction that rolled back, or
failed at its commit, gets its row afterwards, in autocommit; the event or payout it
names may then have been rolled back with it, and the row keeps only the ones that
exist (no foreign-key constraint would catch it: see the model).
"""

import json

from django.db import connection

import txutils
from payouts.models import Payout, TransactionLog, WebhookEvent

# Fixed statements: one runs in every outermost transaction, so they skip the ORM.
COLUMNS = """INSERT INTO {table}
    (operation, isolation_level, read_only, attempts, sqlstates, duration_ms, outcome, error,
     started_at, event_id, payout_id, context)
VALUES (%s, %s, %s, %s, %s::varchar(5)[], %s, %s, %s, %s, {event}, {payout}, %s)"""
INSERT_SQL = COLUMNS.format(table=TransactionLog._meta.db_table, event="%s", payout="%s")
# After a transaction that did not commit: ids of rows it may have created are checked.
INSERT_AFTER_SQL = COLUMNS.format(
    table=TransactionLog._meta.db_table,
    event=f"(SELECT id FROM {WebhookEvent._meta.db_table} WHERE id = %s)",
    payout=f"(SELECT id FROM {Payout._meta.db_table} WHERE id = %s)")


def store_transaction_log(record: txutils.TransactionRecord) -> None:
    context = dict(record.context)
    event_id, payout_id = context.pop("event_id", None), context.pop("payout_id", None)
    sql = INSERT_SQL if connection.in_atomic_block else INSERT_AFTER_SQL
    with connection.cursor() as cursor:
        cursor.execute(sql, [
            record.operation[:200], record.isolation_level or "", record.read_only,
            record.attempts, record.sqlstates, record.duration_ms, str(record.outcome),
            record.error or "", record.started_at, event_id, payout_id, json.dumps(context),
        ])
