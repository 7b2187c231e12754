"""The payout ledger: who is owed what, and what has been paid out to whom."""

from django.db import models
from django.db.models import Q
from django.urls import reverse


class Seller(models.Model):
    name = models.CharField(max_length=200)
    stripe_account_id = models.CharField(max_length=64, unique=True)  # acct_…
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["name"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.stripe_account_id})"


class PaymentTransaction(models.Model):
    """A buyer payment owed to a seller; ``payed_out`` once it is in a payout."""

    seller = models.ForeignKey(Seller, on_delete=models.PROTECT, related_name="transactions")
    amount = models.BigIntegerField(help_text="minor units")
    currency = models.CharField(max_length=3)
    release_date = models.DateField()
    payed_out = models.BooleanField(default=False)
    actual_release_date = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            # The payout run's lookup: a seller's released, not yet paid-out money.
            models.Index(fields=["seller", "release_date"], condition=Q(payed_out=False),
                         name="txn_unpaid_by_seller"),
        ]

    def __str__(self) -> str:
        return f"txn {self.pk}: {self.amount} {self.currency}"


class PaymentTransfer(models.Model):
    """Platform → seller transfer (``tr_…``) for one transaction."""

    class Status(models.TextChoices):
        PENDING = "pending"
        PAID = "paid"
        FAILED = "failed"
        REVERSED = "reversed"

    payment_transaction = models.ForeignKey(PaymentTransaction, on_delete=models.PROTECT,
                                            related_name="transfers")
    stripe_transfer_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    amount = models.BigIntegerField(help_text="minor units")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.stripe_transfer_id or f"transfer {self.pk}"


class Payout(models.Model):
    """Seller balance → bank (``po_…``), kept at the state of the newest event applied."""

    class Status(models.TextChoices):
        PENDING = "pending"
        IN_TRANSIT = "in_transit"
        PAID = "paid"
        FAILED = "failed"
        CANCELED = "canceled"

    class Creation(models.TextChoices):
        """Where a payout we create ourselves stands (empty: created from a webhook)."""

        RESERVED = "reserved", "reserved (phase 1 done; Stripe not called or not answered)"
        SUBMITTED = "submitted", "submitted (Stripe ids recorded)"
        FAILED = "failed", "failed at Stripe (transactions released)"

    seller = models.ForeignKey(Seller, on_delete=models.PROTECT, null=True, blank=True,
                               related_name="payouts", help_text="empty for platform payouts")
    # Our own id, in Stripe's metadata and idempotency keys, before Stripe's id exists.
    reference = models.CharField(max_length=40, unique=True, null=True, blank=True)
    creation_state = models.CharField(max_length=16, choices=Creation.choices, blank=True,
                                      default="")
    creation_error = models.TextField(blank=True, default="")
    stripe_payout_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    amount = models.BigIntegerField(help_text="minor units")
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    arrival_date = models.DateTimeField(null=True, blank=True)
    failure_code = models.CharField(max_length=64, blank=True, default="")
    failure_message = models.TextField(blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True, help_text="Stripe's payout metadata")
    # Ordering bookkeeping: the newest event applied decides what is older.
    last_event_id = models.CharField(max_length=64, blank=True, default="")
    last_event_type = models.CharField(max_length=64, blank=True, default="")
    last_event_created = models.DateTimeField(null=True, blank=True)
    events_applied = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        permissions = [("view_health", "Can view payout health")]
        indexes = [
            models.Index(fields=["status", "-created_at"]),
            models.Index(fields=["seller", "-created_at"]),
            models.Index(fields=["-created_at"]),
            models.Index(fields=["failure_code"], condition=~Q(failure_code=""),
                         name="payout_failure_code"),
            models.Index(fields=["arrival_date"], condition=Q(status="in_transit"),
                         name="payout_in_transit_arrival"),
            models.Index(fields=["created_at"], condition=Q(creation_state="reserved"),
                         name="payout_resumable"),
        ]

    def __str__(self) -> str:
        return self.stripe_payout_id or self.reference or f"payout {self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("payout-detail", args=[self.pk])


class PayoutItem(models.Model):
    payout = models.ForeignKey(Payout, on_delete=models.CASCADE, related_name="payout_items")
    payment_transfer = models.ForeignKey(PaymentTransfer, on_delete=models.PROTECT,
                                         related_name="payout_items")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["payout", "payment_transfer"],
                                    name="payout_item_unique_transfer"),
        ]

    def __str__(self) -> str:
        return f"item {self.pk} of payout {self.payout_id}"
