"""The audit trail: what people did to events and payouts, with the payout before and after."""

from django.conf import settings
from django.db import models
from django.utils import timezone


class AuditEntry(models.Model):
    """One action by a person (or a job a person started): who, when, what, the outcome,
    and the payout's state before and after. Written by the services, never edited."""

    class Action(models.TextChoices):
        REPLAY = "replay"
        DISMISS = "dismiss"
        RESYNC = "resync"  # Resync from Stripe on a payout
        BULK_REPLAY = "bulk_replay"  # a bulk replay job asked for, finished or canceled
        APPROVAL = "approval"  # a second person approved or rejected a bulk replay

    at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL,
                              null=True, blank=True, related_name="+")
    actor_name = models.CharField(max_length=150)  # kept if the user is deleted
    action = models.CharField(max_length=16, choices=Action.choices)
    target = models.CharField(max_length=200)  # "evt_…", "po_…", "bulk replay 7"
    event = models.ForeignKey("payouts.WebhookEvent", on_delete=models.SET_NULL, null=True,
                              blank=True, related_name="+")
    payout = models.ForeignKey("payouts.Payout", on_delete=models.SET_NULL, null=True,
                               blank=True, related_name="+")
    outcome = models.CharField(max_length=32)
    detail = models.TextField(blank=True, default="")
    # The payout as the actor left it, and as it was (payouts.services.audit.payout_state).
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["-at"]), models.Index(fields=["actor_name", "-at"]),
                   models.Index(fields=["action", "-at"])]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.actor_name} {self.action} {self.target}"
