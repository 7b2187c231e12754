"""django-tables2 tables of the console."""

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import django_tables2 as tables
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.timesince import timesince

from payouts.models import AuditEntry, Payout, TransactionLog, WebhookEvent
from payouts.services.audit import describe_change


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


def when(at: datetime) -> str:
    """A moment as "3 minutes ago", the exact UTC time on hover and below."""
    exact = f"{at:%Y-%m-%d %H:%M:%S} UTC"
    now = timezone.now()
    ago = "just now" if now - at < timedelta(minutes=1) else f"{timesince(at, now, depth=1)} ago"
    return format_html('<time datetime="{}" title="{}">{}</time><span class="sub muted">{}</span>',
                       at.isoformat(), exact, ago, f"{at:%Y-%m-%d %H:%M} UTC")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (=, +, -, @: a dismissal's reason
    is typed by a person) is exported with a leading apostrophe, as plain text."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class AuditTable(tables.Table):
    at = tables.Column(verbose_name="When")
    actor_name = tables.Column(verbose_name="Who")
    action = tables.Column()
    target = tables.Column(verbose_name="Target", attrs={"td": {"class": "mono"}})
    payout = tables.Column(accessor="payout__stripe_payout_id", verbose_name="Payout",
                           default="", visible=False)  # CSV only; the page shows it by the target
    outcome = BadgeColumn()
    change = tables.Column(verbose_name="Payout before → after", empty_values=(),
                           orderable=False)
    detail = tables.Column(orderable=False, attrs={"td": {"class": "detail"}})

    class Meta:
        model = AuditEntry
        fields = ["at", "actor_name", "action", "target", "payout", "outcome", "change",
                  "detail"]
        order_by = "-at"
        attrs = {"class": "table", "id": "audit-table"}

    def render_at(self, value: datetime) -> str:
        return when(value)

    def value_at(self, value: datetime) -> str:
        return value.isoformat()  # with its offset: +00:00

    def render_action(self, record: AuditEntry) -> str:
        return record.get_action_display()

    # The CSV: plain values, not the page's HTML.
    def value_action(self, record: AuditEntry) -> str:
        return record.action

    def value_target(self, value: str) -> str:
        return value

    def value_outcome(self, value: str) -> str:
        return value

    def render_target(self, value: str, record: AuditEntry) -> str:
        """The event or payout acted on, linked; an event's payout below it."""
        if record.event_id:
            shown = format_html('<a href="{}">{}</a>',
                                reverse("event-detail", args=[record.event_id]), value)
        elif record.payout_id:
            return format_html('<a href="{}">{}</a>',
                               reverse("payout-detail", args=[record.payout_id]), value)
        else:
            return value
        if record.payout_id and record.payout is not None:
            shown = format_html('{}<a class="sub" href="{}">{}</a>', shown,
                                reverse("payout-detail", args=[record.payout_id]),
                                record.payout.stripe_payout_id or record.payout)
        return shown

    def render_change(self, record: AuditEntry) -> str:
        return describe_change(record.before, record.after) or "—"

    def value_change(self, record: AuditEntry) -> str:
        return describe_change(record.before, record.after)

    def as_values(self, exclude_columns: Any = None) -> Iterator[list[Any]]:
        for row in super().as_values(exclude_columns):
            yield [spreadsheet_safe(value) for value in row]
