"""PostgreSQL transactions for money: explicit isolation, whole retries, one record each.

The only code in the project that knows isolation levels and retries.
"""

from txutils.core import (
    DEADLOCK_DETECTED,
    RETRYABLE_SQLSTATES,
    SERIALIZATION_FAILURE,
    DeadlockError,
    IsolationLevel,
    TransactionError,
    annotate,
    atomic_with_isolation,
    financial_transaction,
    get_current_isolation_level,
    log_transaction_performance,
    retry_on_deadlock,
    rollback_safe_operation,
    serializable_transaction,
    sqlstate_of,
)
from txutils.records import Outcome, TransactionRecord, add_sink, remove_sink

__all__ = [
    "DEADLOCK_DETECTED",
    "RETRYABLE_SQLSTATES",
    "SERIALIZATION_FAILURE",
    "DeadlockError",
    "IsolationLevel",
    "Outcome",
    "TransactionError",
    "TransactionRecord",
    "add_sink",
    "annotate",
    "atomic_with_isolation",
    "financial_transaction",
    "get_current_isolation_level",
    "log_transaction_performance",
    "remove_sink",
    "retry_on_deadlock",
    "rollback_safe_operation",
    "serializable_transaction",
    "sqlstate_of",
]
