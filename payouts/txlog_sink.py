"""Stores each txutils TransactionRecord as a TransactionLog row, after its transaction ended."""

import json

from django.db import connection

import txutils
from payouts.models import TransactionLog

# One fixed statement: this runs after every outermost transaction, so it skips the ORM.
INSERT_SQL = f"""
INSERT INTO {TransactionLog._meta.db_table}
    (operation, isolation_level, read_only, attempts, sqlstates, duration_ms, outcome, error,
     started_at, event_id, payout_id, context)
VALUES (%s, %s, %s, %s, %s::varchar(5)[], %s, %s, %s, %s, %s, %s, %s)"""


def store_transaction_log(record: txutils.TransactionRecord) -> None:
    context = dict(record.context)
    event_id, payout_id = context.pop("event_id", None), context.pop("payout_id", None)
    with connection.cursor() as cursor:
        cursor.execute(INSERT_SQL, [
            record.operation[:200], record.isolation_level or "", record.read_only,
            record.attempts, record.sqlstates, record.duration_ms, str(record.outcome),
            record.error or "", record.started_at, event_id, payout_id, json.dumps(context),
        ])
