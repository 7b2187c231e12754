"""django-tables2 tables of the console."""

from typing import Any

import django_tables2 as tables
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from payouts.models import Payout, TransactionLog, WebhookEvent


def money(amount: int | None, currency: str) -> str:
    if amount is None:
        return "—"
    return f"{amount / 100:,.2f} {currency.upper()}"


def status_badge(value: str) -> str:
    return format_html('<span class="badge badge-{}">{}</span>', value, value.replace("_", " "))


def payout_status(payout: Payout) -> str:
    """A payout's status wherever the console shows one: Stripe's status, then whether it
    was reversed, is a reversal, or is marked for review."""
    parts = [status_badge(payout.status)]
    if payout.is_reversed:
        parts.append(format_html('<span class="badge badge-reversed" title="reversed by {}">'
                                 'reversed</span>', payout.reversed_by))
    if payout.original_payout_id:
        parts.append(mark_safe('<span class="badge badge-reversal">reversal</span>'))
    if payout.review_reason:
        parts.append(format_html('<span class="badge badge-review" title="{}">to review</span>',
                                 payout.review_reason))
    return format_html_join(" ", "{}", ((part,) for part in parts))


class PayoutStatusColumn(tables.Column):
    def render(self, record: Payout) -> str:
        return payout_status(record)


class BadgeColumn(tables.Column):
    """A status code as a coloured badge: the code itself, not the choice's label."""

    def render(self, record: Any, bound_column: Any) -> str:
        return status_badge(bound_column.accessor.resolve(record))


class PayoutTable(tables.Table):
    stripe_payout_id = tables.Column(verbose_name="Payout", linkify=True,
                                     attrs={"td": {"class": "mono"}})
    seller = tables.Column(accessor="seller__name", verbose_name="Seller",
                           order_by=("seller__name",), default="platform")
    amount = tables.Column()
    status = PayoutStatusColumn()
    failure_code = tables.Column(verbose_name="Failure")
    arrival_date = tables.DateTimeColumn(format="Y-m-d", verbose_name="Arrival")
    last_event_type = tables.Column(verbose_name="Last event")
    created_at = tables.DateTimeColumn(format="Y-m-d H:i", verbose_name="Created")

    class Meta:
        model = Payout
        fields = ["stripe_payout_id", "seller", "amount", "status", "failure_code",
                  "arrival_date", "last_event_type", "created_at"]
        order_by = "-created_at"
        attrs = {"class": "table", "id": "payouts-table"}

    def render_amount(self, value: int, record: Payout) -> str:
        return money(value, record.currency)



class EventTable(tables.Table):
    select = tables.CheckBoxColumn(accessor="pk", attrs={
        "th__input": {"aria-label": "select all", "data-select-all": "event_ids"},
        "td__input": {"name": "event_ids", "form": "bulk-replay"}}, orderable=False)
    stripe_event_id = tables.Column(verbose_name="Event", linkify=True,
                                    attrs={"td": {"class": "mono"}})
    type = tables.Column()
    status = BadgeColumn()
    status_reason = tables.Column(verbose_name="Why", orderable=False, empty_values=())
    stripe_object_id = tables.Column(verbose_name="Object", attrs={"td": {"class": "mono"}})
    stripe_created = tables.DateTimeColumn(format="Y-m-d H:i", verbose_name="Created",
                                           attrs={"td": {"class": "num"}})
    attempts = tables.Column()
    replay = tables.TemplateColumn(template_name="console/_replay_button.html",
                                   orderable=False, verbose_name="")

    class Meta:
        model = WebhookEvent
        fields = ["select", "stripe_event_id", "type", "status", "status_reason",
                  "stripe_object_id", "stripe_created", "attempts", "replay"]
        order_by = "-received_at"
        attrs = {"class": "table", "id": "events-table"}
        row_attrs = {"id": lambda record: f"event-{record.pk}"}
        template_name = "console/_events_table.html"

    def render_status_reason(self, value: str, record: WebhookEvent) -> str:
        """Why; for a dead event also how long Stripe still keeps it (to list it again)."""
        kept_until = record.kept_by_stripe_until
        if record.status != WebhookEvent.Status.DEAD or kept_until is None:
            return value or "—"
        if kept_until > timezone.now():
            kept = format_html('<span class="kept" title="Stripe\'s Events API lists an event '
                               'for 30 days after it was created">kept at Stripe until {} UTC'
                               '</span>', f"{kept_until:%Y-%m-%d %H:%M}")
        else:
            kept = format_html('<span class="kept gone">no longer kept at Stripe (since {} UTC)'
                               '</span>', f"{kept_until:%Y-%m-%d %H:%M}")
        return format_html("{}{}", value or "", kept)



class TransactionLogTable(tables.Table):
    started_at = tables.DateTimeColumn(format="Y-m-d H:i:s", verbose_name="Started")
    operation = tables.Column()
    isolation_level = tables.Column(verbose_name="Isolation")
    attempts = tables.Column()
    sqlstates = tables.Column(verbose_name="SQLSTATEs", orderable=False)
    duration_ms = tables.Column(verbose_name="Duration")
    outcome = BadgeColumn()
    event = tables.Column(accessor="event__stripe_event_id", verbose_name="Event",
                          orderable=False, default="")

    class Meta:
        model = TransactionLog
        fields = ["started_at", "operation", "isolation_level", "attempts", "sqlstates",
                  "duration_ms", "outcome", "event"]
        order_by = "-started_at"
        attrs = {"class": "table", "id": "txlogs-table"}

    def render_sqlstates(self, value: list[str]) -> str:
        return ", ".join(value) or "—"

    def render_duration_ms(self, value: float) -> str:
        return f"{value:,.1f} ms"


    def render_event(self, value: str, record: TransactionLog) -> Any:
        url = reverse("event-detail", args=[record.event_id])
        return format_html('<a class="mono" href="{}">{}</a>', url, value)
