from payouts.models.audit import AuditEntry
from payouts.models.bulk import BulkReplay
from payouts.models.jobs import JobRun, ScheduledJob
from payouts.models.ledger import PaymentTransaction, PaymentTransfer, Payout, PayoutItem, Seller
from payouts.models.txlog import TransactionLog
from payouts.models.webhooks import WebhookEvent, WebhookEventAttempt, WebhookRejection

__all__ = [
    "AuditEntry",
    "BulkReplay",
    "JobRun",
    "PaymentTransaction",
    "PaymentTransfer",
    "Payout",
    "PayoutItem",
    "ScheduledJob",
    "Seller",
    "TransactionLog",
    "WebhookEvent",
    "WebhookEventAttempt",
    "WebhookRejection",
]
