"""Alerts: a rule's condition seen by the alert job, opened once and resolved once."""

from django.db import models
from django.db.models import Q

_OPEN = Q(resolved_at__isnull=True)


class Alert(models.Model):
    """One episode of a rule holding for one subject (a failure code, a seller, a job; ""
    for a rule about the whole system). At most one open per (rule, subject), by a partial
    unique index, so two evaluators at once cannot open it twice. Its two notifications
    (opened, resolved) are each delivered once; a failed delivery is retried later."""

    OPEN = _OPEN  # not resolved yet: what "open" means for the unique index and every query

    rule = models.CharField(max_length=64)
    subject = models.CharField(max_length=200, blank=True, default="")
    summary = models.TextField()  # the latest evaluation's words, e.g. "3 dead events"
    value = models.FloatField(null=True, blank=True)  # the latest figure behind it
    opened_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()  # the latest evaluation that found it holding
    resolved_at = models.DateTimeField(null=True, blank=True)
    notified_open_at = models.DateTimeField(null=True, blank=True)
    notified_resolved_at = models.DateTimeField(null=True, blank=True)
    # The notification in hand (open, then resolved): the channels it reached so far, the
    # tries it took, when to try again (also a short lease while one evaluator sends).
    delivered_to = models.JSONField(default=list, blank=True)
    delivery_attempts = models.PositiveIntegerField(default=0)
    next_delivery_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["rule", "subject"],
                                    condition=_OPEN,
                                    name="alert_one_open_per_rule_subject"),
        ]
        indexes = [models.Index(fields=["-opened_at"])]

    def __str__(self) -> str:
        return f"{self.rule}{f' {self.subject}' if self.subject else ''}: {self.summary}"

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None
