from django.contrib.postgres.fields import ArrayField
from django.db import models

from payouts.models.ledger import Payout
from payouts.models.webhooks import WebhookEvent


class TransactionLog(models.Model):
    """One row per outermost transaction run by txutils (see txutils.records)."""

    operation = models.CharField(max_length=200)
    isolation_level = models.CharField(max_length=32, blank=True, default="")
    read_only = models.BooleanField(default=False)
    attempts = models.PositiveIntegerField()
    sqlstates = ArrayField(models.CharField(max_length=5), default=list, blank=True)
    duration_ms = models.FloatField()
    outcome = models.CharField(max_length=32)
    error = models.TextField(blank=True, default="")
    started_at = models.DateTimeField()
    # No foreign-key constraints: the row is written inside the SERIALIZABLE transaction it
    # describes, and checking one at commit reads the index pages every concurrent
    # delivery inserts its event into: a serialization failure for most of them. Deletes
    # through Django still set these to NULL, and so does prune.
    event = models.ForeignKey(WebhookEvent, on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="transaction_logs", db_constraint=False)
    payout = models.ForeignKey(Payout, on_delete=models.SET_NULL, null=True, blank=True,
                               related_name="transaction_logs", db_constraint=False)
    context = models.JSONField(default=dict, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["-started_at"]),
            models.Index(fields=["operation", "-started_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.operation} {self.outcome} ({self.attempts} attempts)"
