"""Bulk replays: a frozen list of events replayed by the workers, with its progress."""

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone


class BulkReplay(models.Model):
    """One bulk replay asked for in the console. The events are decided when it is asked
    for (``event_ids``), so its count is exact and an approval covers exactly those.
    A worker leases it (``leased_by``, ``lease_until``) and replays ``event_ids[done:]``
    one by one, saving its position and counts every few events."""

    class Status(models.TextChoices):
        AWAITING_APPROVAL = "awaiting_approval"  # live and large: a second person decides
        QUEUED = "queued"
        RUNNING = "running"
        CANCELED = "canceled"
        REJECTED = "rejected"
        DONE = "done"

    ACTIVE = (Status.AWAITING_APPROVAL, Status.QUEUED, Status.RUNNING)
    # The processor's outcomes, each counted in the column of the same name.
    OUTCOMES = ("applied", "skipped", "held", "failed", "ignored", "retry")

    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT,
                                     related_name="+")  # the replays run as this person
    requested_at = models.DateTimeField(default=timezone.now)
    filter_params = models.JSONField(default=dict, blank=True)  # the events list's GET params
    description = models.CharField(max_length=500)  # the filter in words
    event_ids = ArrayField(models.BigIntegerField())  # in replay order
    total = models.PositiveIntegerField()
    done = models.PositiveIntegerField(default=0)
    applied = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    held = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    ignored = models.PositiveIntegerField(default=0)
    retry = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=20, choices=Status.choices)
    cancel_requested = models.BooleanField(default=False)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL,
                                   null=True, blank=True, related_name="+")  # approved/rejected
    decision_reason = models.TextField(blank=True, default="")
    decided_at = models.DateTimeField(null=True, blank=True)
    leased_by = models.CharField(max_length=128, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-requested_at", "-id"]
        indexes = [
            # The workers' claim: queued jobs, and running ones whose lease may have run out.
            models.Index(fields=["requested_at"], name="bulkreplay_claim",
                         condition=models.Q(status__in=["queued", "running"])),
        ]

    def __str__(self) -> str:
        return f"bulk replay {self.pk}"

    @property
    def percent(self) -> int:
        return 100 * self.done // self.total if self.total else 100

    @property
    def counts(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in self.OUTCOMES}

    @property
    def active(self) -> bool:
        return self.status in self.ACTIVE
