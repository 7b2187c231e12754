"""django-tables2 tables of the console."""

from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import django_tables2 as tables
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from console import formats
from payouts import selectors
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


def seller_link(name: str | None, account: str) -> str:
    """A seller, linked to its payouts; the platform when there is no connected account."""
    if not account:
        return mark_safe('<span class="muted">platform</span>')
    url = f"{reverse('payout-list')}?{urlencode({'q': account})}"
    return format_html('<a href="{}" title="{}">{}</a>', url, account, name or account)


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
                           order_by=("seller__name",), empty_values=())
    amount = tables.Column(attrs={"td": {"class": "amount"}, "th": {"class": "amount"}})
    status = PayoutStatusColumn()
    failure_code = tables.Column(verbose_name="Failure")
    arrival_date = tables.DateTimeColumn(format="Y-m-d", verbose_name="Arrival")
    last_event_type = tables.Column(verbose_name="Last event")
    created_at = tables.Column(verbose_name="Created", attrs={"td": {"class": "when"}})

    class Meta:
        model = Payout
        fields = ["stripe_payout_id", "seller", "amount", "status", "failure_code",
                  "arrival_date", "last_event_type", "created_at"]
        order_by = "-created_at"
        attrs = {"class": "table", "id": "payouts-table"}

    def render_amount(self, value: int, record: Payout) -> str:
        return money(value, record.currency)

    def render_seller(self, record: Payout) -> str:
        seller = record.seller
        return seller_link(seller.name if seller else None,
                           seller.stripe_account_id if seller else "")

    def render_created_at(self, value: Any) -> str:
        return formats.when(value)



class EventTable(tables.Table):
    select = tables.CheckBoxColumn(accessor="pk", attrs={
        "th__input": {"aria-label": "Select every event on this page",
                      "data-select-all": "event_ids"},
        "td__input": {"name": "event_ids", "form": "bulk-replay"}}, orderable=False)
    stripe_event_id = tables.Column(verbose_name="Event", linkify=True,
                                    attrs={"td": {"class": "mono"}})
    type = tables.Column()
    status = tables.Column()
    status_reason = tables.Column(verbose_name="Why", orderable=False, empty_values=(),
                                  attrs={"td": {"class": "why"}})
    seller = tables.Column(accessor="seller_name", verbose_name="Seller", orderable=False,
                           empty_values=())
    stripe_object_id = tables.Column(verbose_name="Object", attrs={"td": {"class": "mono"}})
    received_at = tables.Column(verbose_name="Received", attrs={"td": {"class": "when"}})
    attempt_rows = tables.Column(verbose_name="Attempts", orderable=False, default=0,
                                 attrs={"td": {"class": "num"}, "th": {"class": "num"}})
    actions = tables.TemplateColumn(template_name="console/_replay_button.html",
                                    extra_context={"replayable": selectors.REPLAYABLE},
                                    orderable=False, verbose_name="Actions", empty_values=())

    @classmethod
    def for_attention(cls, queryset: Any) -> "EventTable":
        """Needs attention's events: no selection, no attempt counts."""
        return cls(queryset, exclude=["select", "attempt_rows"], orderable=False)

    class Meta:
        model = WebhookEvent
        fields = ["select", "stripe_event_id", "type", "status", "status_reason", "seller",
                  "stripe_object_id", "received_at", "attempt_rows", "actions"]
        order_by = "-received_at"
        attrs = {"class": "table", "id": "events-table"}
        row_attrs = {"id": lambda record: f"event-{record.pk}"}
        template_name = "console/_events_table.html"

    def render_select(self, value: int, record: WebhookEvent, bound_column: Any) -> str:
        return format_html('<input type="checkbox" name="event_ids" value="{}" form="bulk-replay"'
                           ' aria-label="Select {}">', value, record.stripe_event_id)

    def render_status(self, record: Any) -> str:
        """The status, and the last thing a person did to the event: who, when, outcome."""
        badge = status_badge(record.status)
        if not record.person_action:
            return badge
        verb = "dismissed" if record.person_action == "dismiss" else "replayed"
        who = record.person_name or "a deleted user"
        return format_html('{}<span class="by">{} by {} {} → {}</span>', badge, verb, who,
                           formats.relative_time(record.person_at), record.person_outcome)

    def render_status_reason(self, value: str, record: WebhookEvent) -> str:
        """Why; the last error when there is no reason; when a failed event is retried
        next; for a dead event how long Stripe still keeps it (to list it again)."""
        why = value or record.last_error or "—"
        if record.status == WebhookEvent.Status.FAILED and record.next_attempt_at:
            return format_html('{}<span class="next">next retry {}</span>', why,
                               formats.relative_time(record.next_attempt_at))
        kept_until = record.kept_by_stripe_until
        if record.status != WebhookEvent.Status.DEAD or kept_until is None:
            return why
        if kept_until > timezone.now():
            kept = format_html('<span class="kept" title="Stripe\'s Events API lists an event '
                               'for 30 days after it was created">kept at Stripe until {} UTC'
                               '</span>', f"{kept_until:%Y-%m-%d %H:%M}")
        else:
            kept = format_html('<span class="kept gone">no longer kept at Stripe (since {} UTC)'
                               '</span>', f"{kept_until:%Y-%m-%d %H:%M}")
        return format_html("{}{}", why, kept)

    def render_seller(self, value: str | None, record: WebhookEvent) -> str:
        return seller_link(value, record.account)

    def render_stripe_object_id(self, value: str, record: Any) -> str:
        if record.payout_pk:
            return format_html('<a href="{}">{}</a>',
                               reverse("payout-detail", args=[record.payout_pk]), value)
        return value

    def render_received_at(self, value: Any) -> str:
        return formats.when(value)


class TransactionLogTable(tables.Table):
    started_at = tables.Column(verbose_name="Started", attrs={"td": {"class": "when"}})
    operation = tables.Column()
    isolation_level = tables.Column(verbose_name="Isolation")
    attempts = tables.Column()
    sqlstates = tables.Column(verbose_name="SQLSTATEs", orderable=False)
    duration_ms = tables.Column(verbose_name="Duration",
                                attrs={"td": {"class": "num"}, "th": {"class": "num"}})
    outcome = BadgeColumn()
    event = tables.Column(accessor="event__stripe_event_id", verbose_name="Event",
                          orderable=False, default="")

    class Meta:
        model = TransactionLog
        fields = ["started_at", "operation", "isolation_level", "attempts", "sqlstates",
                  "duration_ms", "outcome", "event"]
        order_by = "-started_at"
        attrs = {"class": "table", "id": "txlogs-table"}

    def render_started_at(self, value: Any) -> str:
        return formats.when(value)

    def render_sqlstates(self, value: list[str]) -> str:
        return ", ".join(value) or "—"

    def render_duration_ms(self, value: float) -> str:
        return f"{value:,.1f} ms"


    def render_event(self, value: str, record: TransactionLog) -> Any:
        url = reverse("event-detail", args=[record.event_id])
        return format_html('<a class="mono" href="{}">{}</a>', url, value)


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
        return formats.when(value)

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
