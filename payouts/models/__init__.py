from payouts.models.alerts import Alert
from payouts.models.audit import AuditEntry
from payouts.models.bulk import BulkReplay
from payouts.models.jobs import JobRun, ScheduledJob
from payouts.models.ledger import PaymentTransaction, PaymentTransfer, Payout, PayoutItem, Seller
from payouts.models.txlog import TransactionLog
from payouts.models.webhooks import (
    RejectionMinute,
    WebhookEvent,
    WebhookEventAttempt,
    WebhookRejection,
)

__all__ = [
    "Alert",
    "AuditEntry",
    "BulkReplay",
    "JobRun",
    "PaymentTransaction",
    "PaymentTransfer",
    "Payout",
    "PayoutItem",
    "RejectionMinute",
    "ScheduledJob",
    "Seller",
    "TransactionLog",
    "WebhookEvent",
    "WebhookEventAttempt",
    "WebhookRejection",
]
