"""Stores each txutils TransactionRecord as a TransactionLog row, after its transaction ended."""

import txutils
from payouts.models import TransactionLog


def store_transaction_log(record: txutils.TransactionRecord) -> None:
    context = dict(record.context)
    TransactionLog.objects.create(
        operation=record.operation[:200],
        isolation_level=record.isolation_level or "",
        read_only=record.read_only,
        attempts=record.attempts,
        sqlstates=record.sqlstates,
        duration_ms=record.duration_ms,
        outcome=str(record.outcome),
        error=record.error or "",
        started_at=record.started_at,
        event_id=context.pop("event_id", None),
        payout_id=context.pop("payout_id", None),
        context=context,
    )
