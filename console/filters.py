"""Filters for the console lists (django-filter): every field is also a plain GET parameter."""

from typing import Any

import django_filters
from django import forms
from django.db.models import Q, QuerySet
from django.utils import timezone

from payouts import selectors
from payouts.models import AuditEntry, Payout, Seller, TransactionLog, WebhookEvent

DATE = forms.DateInput(attrs={"type": "date"})


class PayoutFilter(django_filters.FilterSet):
    q = django_filters.CharFilter(method="search", label="Search",
                                  help_text="po_…, acct_… or seller name")
    status = django_filters.ChoiceFilter(choices=Payout.Status.choices, empty_label="any status")
    failure_code = django_filters.ChoiceFilter(choices=[], label="Failure code",
                                               empty_label="any failure")
    created_after = django_filters.DateFilter(field_name="created_at", lookup_expr="date__gte",
                                              label="Created from", widget=DATE)
    created_before = django_filters.DateFilter(field_name="created_at", lookup_expr="date__lte",
                                               label="to", widget=DATE)
    flag = django_filters.ChoiceFilter(
        method="flagged", label="Marked", empty_label="anything",
        choices=[("review", "to review"), ("stuck", "stuck in transit"), ("reversed", "reversed"),
                 ("reversal", "reversals")])

    class Meta:
        model = Payout
        fields = ["q", "status", "failure_code", "created_after", "created_before", "flag"]

    def __init__(self, *args: Any, failure_codes: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters["failure_code"].extra["choices"] = [(c, c) for c in failure_codes]

    def flagged(self, queryset: QuerySet[Payout], name: str, value: str) -> QuerySet[Payout]:
        return {"review": queryset.exclude(review_reason=""),
                "stuck": queryset.filter(selectors.stuck()),
                "reversed": queryset.filter(reversed_at__isnull=False),
                "reversal": queryset.filter(original_payout__isnull=False)}[value]

    def search(self, queryset: QuerySet[Payout], name: str, value: str) -> QuerySet[Payout]:
        value = value.strip()
        if value.startswith("po_"):
            return queryset.filter(stripe_payout_id__startswith=value)
        if value.startswith("acct_"):
            return queryset.filter(seller__stripe_account_id__startswith=value)
        return queryset.filter(seller__name__icontains=value)


class EventFilter(django_filters.FilterSet):
    q = django_filters.CharFilter(method="search", label="Search",
                                  help_text="seller name, acct_…, po_… or evt_…")
    status = django_filters.ChoiceFilter(choices=WebhookEvent.Status.choices,
                                         empty_label="any status")
    type = django_filters.ChoiceFilter(choices=[], label="Type", empty_label="any type")
    received_after = django_filters.DateFilter(field_name="received_at", lookup_expr="date__gte",
                                               label="Received from", widget=DATE)
    received_before = django_filters.DateFilter(field_name="received_at",
                                                lookup_expr="date__lte", label="to", widget=DATE)
    queue = django_filters.ChoiceFilter(method="in_queue", label="Queue", empty_label="any",
                                        choices=[("due", "due now")])

    class Meta:
        model = WebhookEvent
        fields = ["q", "status", "type", "received_after", "received_before", "queue"]

    def __init__(self, *args: Any, types: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters["type"].extra["choices"] = [(t, t) for t in types]

    def in_queue(self, queryset: QuerySet[WebhookEvent], name: str,
                 value: str) -> QuerySet[WebhookEvent]:
        return selectors.events_due(timezone.now(), queryset)  # Health's backlog links here

    def search(self, queryset: QuerySet[WebhookEvent], name: str,
               value: str) -> QuerySet[WebhookEvent]:
        value = value.strip()
        if value.startswith("evt_"):
            return queryset.filter(stripe_event_id__startswith=value)
        if value.startswith("acct_"):
            return queryset.filter(account=value)  # a whole id: the (account, received) index
        if value.startswith(("po_", "resync_")):
            return queryset.filter(Q(stripe_object_id__startswith=value)
                                   | Q(stripe_event_id__startswith=value))
        accounts = Seller.objects.filter(name__icontains=value).values("stripe_account_id")
        return queryset.filter(account__in=accounts)


class TransactionLogFilter(django_filters.FilterSet):
    operation = django_filters.ChoiceFilter(choices=[], empty_label="any operation")
    outcome = django_filters.ChoiceFilter(
        choices=[("committed", "committed"), ("rolled_back", "rolled back"),
                 ("retries_exhausted", "retries exhausted")], empty_label="any outcome")
    isolation_level = django_filters.ChoiceFilter(
        choices=[(v, v) for v in ("serializable", "repeatable read", "read committed")],
        empty_label="any level")
    min_duration_ms = django_filters.NumberFilter(field_name="duration_ms", lookup_expr="gte",
                                                  label="Min duration (ms)")

    class Meta:
        model = TransactionLog
        fields = ["operation", "outcome", "isolation_level", "min_duration_ms"]

    def __init__(self, *args: Any, operations: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters["operation"].extra["choices"] = [(op, op) for op in operations]


class AuditFilter(django_filters.FilterSet):
    user = django_filters.ChoiceFilter(field_name="actor_name", label="User", choices=[],
                                       empty_label="anyone")
    action = django_filters.ChoiceFilter(choices=AuditEntry.Action.choices,
                                         empty_label="any action")
    after = django_filters.DateFilter(field_name="at", lookup_expr="date__gte", label="From",
                                      widget=DATE)
    before = django_filters.DateFilter(field_name="at", lookup_expr="date__lte", label="to",
                                       widget=DATE)

    class Meta:
        model = AuditEntry
        fields = ["user", "action", "after", "before"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters["user"].extra["choices"] = [
            (name, name) for name in selectors.audit_actor_names()]
