"""The webhook inbox: every verified delivery, its processing attempts, and rejections."""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse


class WebhookEvent(models.Model):
    """One Stripe event, stored exactly as received before anything is done with it."""

    class Status(models.TextChoices):
        RECEIVED = "received"  # stored, not processed yet
        PROCESSED = "processed"  # applied to the ledger
        SKIPPED = "skipped"  # valid, but changes nothing (older, final state, ...)
        IGNORED = "ignored"  # a type we do not handle, or test mode on a live deployment
        FAILED = "failed"  # will be retried (see next_attempt_at)
        DEAD = "dead"  # retries exhausted; only a replay moves it
        HELD = "held"  # disagrees with our ledger: a person replays or dismisses it

    class Source(models.TextChoices):
        """How the event reached us."""

        DELIVERY = "delivery", "webhook delivery"  # Stripe POSTed it to our endpoint
        EVENTS_API = "events_api", "Events API"  # sync_events listed it: a missed delivery
        # Not Stripe's event: Stripe's payout (GET /v1/payouts/…) as an event, made by
        # reconcile_payouts, a Resync from the console, or for an unknown payout.
        RESYNC = "resync", "resync from Stripe"

    # Statuses the worker picks up when due.
    PENDING = (Status.RECEIVED, Status.FAILED)
    # Done with: applied, or nothing to apply.
    SETTLED = (Status.PROCESSED, Status.SKIPPED, Status.IGNORED)
    # Stripe's Events API keeps an event this long after it was created.
    KEPT_BY_STRIPE = timedelta(days=30)

    stripe_event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    account = models.CharField(max_length=64, blank=True, default="")
    livemode = models.BooleanField(default=False)
    api_version = models.CharField(max_length=64, blank=True, default="")
    stripe_created = models.DateTimeField()
    stripe_object_id = models.CharField(max_length=255, blank=True, default="",
                                        help_text="data.object.id, e.g. the po_… of a payout event")
    raw_body = models.BinaryField(help_text="the request body exactly as received")
    headers = models.JSONField(default=dict, blank=True, help_text="sanitised request headers")
    received_at = models.DateTimeField(auto_now_add=True)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.DELIVERY,
                              db_default=Source.DELIVERY)
    # Who or what asked for it, for events we fetched or made ("sync_events (schedule)",
    # "Resync from Stripe by alice"); the user too when a person asked.
    source_detail = models.CharField(max_length=200, blank=True, default="", db_default="")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL,
                                     null=True, blank=True, related_name="+")

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    status_reason = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # Who holds the event's lease (a worker, or the inline request); empty once the
    # attempt settled. A due event still claimed was abandoned: its worker died.
    claimed_by = models.CharField(max_length=128, blank=True, default="", db_default="")
    last_error = models.TextField(blank=True, default="")
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        permissions = [("replay_webhookevent", "Can replay webhook events")]
        indexes = [
            # The worker's claim: due events in order.
            models.Index(fields=["next_attempt_at"], condition=Q(status__in=["received", "failed"]),
                         name="webhook_event_due"),
            models.Index(fields=["status", "-received_at"]),
            models.Index(fields=["stripe_object_id", "stripe_created"]),
            models.Index(fields=["type", "-received_at"]),
            models.Index(fields=["account", "-received_at"]),
            models.Index(fields=["-received_at"]),
            # Health's processing latency: events settled in a window.
            models.Index(fields=["processed_at"], include=["received_at"],
                         condition=Q(processed_at__isnull=False), name="webhook_event_settled"),
        ]

    def __str__(self) -> str:
        return f"{self.stripe_event_id} ({self.type})"

    def get_absolute_url(self) -> str:
        return reverse("event-detail", args=[self.pk])

    @property
    def kept_by_stripe_until(self) -> datetime | None:
        """Until when Stripe's Events API still lists it (None: not Stripe's event)."""
        if self.source == self.Source.RESYNC:
            return None
        return self.stripe_created + self.KEPT_BY_STRIPE


class WebhookEventAttempt(models.Model):
    """One run of the processor for an event: automatic, or a replay by staff."""

    class Trigger(models.TextChoices):
        INLINE = "inline"  # right after the delivery was stored
        WORKER = "worker"  # process_webhooks
        REPLAY = "replay"  # staff, from the console or admin
        DISMISS = "dismiss"  # staff decided a held event is not to be applied
        ABANDONED = "abandoned"  # its worker stopped before finishing (found afterwards)

    class Outcome(models.TextChoices):
        """What a run of the processor did: the one vocabulary of outcomes."""

        APPLIED = "applied"
        SKIPPED = "skipped"
        IGNORED = "ignored"
        HELD = "held"  # disagrees with our ledger; nothing changed
        RETRY = "retry"  # e.g. payout not known yet, or busy
        FAILED = "failed"  # an error

    # No database constraint: its check would read the events' newest index page inside
    # the inline SERIALIZABLE transaction, where every concurrent delivery inserts its
    # event, and make unrelated deliveries conflict (bench: 9 % of them retried). The
    # attempt is inserted in the statement that inserts its event, or for an event row
    # locked in the same transaction; deletes cascade through Django.
    event = models.ForeignKey(WebhookEvent, on_delete=models.CASCADE, related_name="attempts_log",
                              db_constraint=False)
    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL,
                                     null=True, blank=True, related_name="+")
    worker = models.CharField(max_length=128, blank=True, default="")
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    reason = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    status_after = models.CharField(max_length=16, choices=WebhookEvent.Status.choices)

    class Meta:
        ordering = ["started_at", "id"]
        indexes = [models.Index(fields=["event", "started_at"])]

    def __str__(self) -> str:
        return f"{self.trigger} attempt: {self.outcome}"


class WebhookRejection(models.Model):
    """Count of refused deliveries per reason: one row per reason, so junk never grows it."""

    reason = models.CharField(max_length=64, primary_key=True)
    count = models.BigIntegerField(default=0)
    last_seen_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.reason}: {self.count}"


class RejectionMinute(models.Model):
    """Refused deliveries per reason and minute, added by the same statement as
    ``WebhookRejection``: the alert job's window ("20 bad signatures in 5 minutes").
    Old minutes are deleted by the alert job."""

    reason = models.CharField(max_length=64)
    minute = models.DateTimeField()
    count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["reason", "minute"],
                                               name="rejection_minute_unique")]
        indexes = [models.Index(fields=["minute"])]

    def __str__(self) -> str:
        return f"{self.reason} {self.minute:%H:%M}: {self.count}"
