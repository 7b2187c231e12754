from payouts.models.ledger import PaymentTransaction, PaymentTransfer, Payout, PayoutItem, Seller
from payouts.models.txlog import TransactionLog
from payouts.models.webhooks import WebhookEvent, WebhookEventAttempt, WebhookRejection

__all__ = [
    "PaymentTransaction",
    "PaymentTransfer",
    "Payout",
    "PayoutItem",
    "Seller",
    "TransactionLog",
    "WebhookEvent",
    "WebhookEventAttempt",
    "WebhookRejection",
]
