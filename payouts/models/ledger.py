"""The payout ledger: who is owed what, and what has been paid out to whom."""

from django.contrib.postgres.indexes import HashIndex
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
    """Seller balance → bank (``po_…``), kept at the state of the newest event applied.

    A payout reversal is a payout too (negative amount, ``original_payout`` set); once
    it is paid the original's money is back on the seller's Stripe balance, and the
    original counts as reversed (``reversed_at``). See docs/design.md.
    """

    class Status(models.TextChoices):
        """Stripe's payout statuses, the only definition in the code."""

        PENDING = "pending"
        IN_TRANSIT = "in_transit"
        PAID = "paid"
        FAILED = "failed"
        CANCELED = "canceled"

    # Its money has left, or is leaving, the seller's Stripe balance (unless reversed).
    LIVE = (Status.PENDING, Status.IN_TRANSIT, Status.PAID)
    # Stripe gave its money back to the seller's balance: its transactions are owed again.
    RETURNED = (Status.FAILED, Status.CANCELED)

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
    # When our first request for it went to Stripe: its idempotency keys expire 24 h later.
    submitted_at = models.DateTimeField(null=True, blank=True)
    stripe_payout_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    amount = models.BigIntegerField(help_text="minor units")
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    arrival_date = models.DateTimeField(null=True, blank=True)
    failure_code = models.CharField(max_length=64, blank=True, default="")
    failure_message = models.TextField(blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True, help_text="Stripe's payout metadata")
    # Reversals: set on a reversal payout, pointing at the payout it reverses. Indexed for
    # reversals only (below): a full index would take an entry on every status change.
    original_payout = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True,
                                        related_name="reversals", db_index=False)
    # Set on the reversed payout: Stripe's id of its reversal, and when that was paid
    # (the money is back on the balance and the transactions were released).
    reversed_by = models.CharField(max_length=64, blank=True, default="", db_default="")
    reversed_at = models.DateTimeField(null=True, blank=True)
    # Why a person (or reconciliation against Stripe) should look at this payout; empty
    # when nothing is open.
    review_reason = models.TextField(blank=True, default="", db_default="")
    review_requested_at = models.DateTimeField(null=True, blank=True)
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
            models.Index(fields=["review_requested_at"], condition=~Q(review_reason=""),
                         name="payout_to_review"),
            models.Index(fields=["original_payout"], condition=Q(original_payout__isnull=False),
                         name="payout_reversals"),
            # What the processor finds a payout by. SERIALIZABLE locks the index pages a
            # lookup reads, and a status change writes a new entry into every index; in a
            # btree, ids Stripe made close in time (a long shared prefix) sit on the same
            # page, so two deliveries for neighbouring payouts made each other fail (40001).
            # A hash index scatters them over its buckets; the planner prefers it for `=`.
            HashIndex(fields=["stripe_payout_id"], name="payout_stripe_id_hash"),
        ]

    def __str__(self) -> str:
        return self.stripe_payout_id or self.reference or f"payout {self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("payout-detail", args=[self.pk])

    @property
    def is_reversed(self) -> bool:
        return self.reversed_at is not None

    @property
    def is_live(self) -> bool:
        """Its money is on its way to, or at, the bank: its transactions stay paid out."""
        return self.status in self.LIVE and not self.is_reversed


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
