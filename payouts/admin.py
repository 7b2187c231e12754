"""Django admin: browse everything. The ledger is read-only here: payouts, their items,
transfers, transactions, events, attempts, transaction logs and job runs cannot be added,
changed or deleted in the admin (not even by a superuser); every change to money goes
through the services, which record it (an attempt, a transaction log, a job run). What
stays editable: sellers, and Django's users and groups (and axes' lockouts, to lift one).
The one write the admin offers on the ledger is *Replay selected events*, through the
same service as the console."""

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from payouts import selectors
from payouts.models import (
    Alert,
    AuditEntry,
    BulkReplay,
    JobRun,
    PaymentTransaction,
    PaymentTransfer,
    Payout,
    PayoutItem,
    ScheduledJob,
    Seller,
    TransactionLog,
    WebhookEvent,
    WebhookEventAttempt,
    WebhookRejection,
)
from payouts.services.processing import event_replay


class ReadOnly:
    """Listed and viewed only: adding, changing or deleting is refused (403), whoever asks."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyAdmin(ReadOnly, admin.ModelAdmin):
    pass


class ReadOnlyInline(ReadOnly, admin.TabularInline):
    extra = 0
    can_delete = False


@admin.register(Seller)
class SellerAdmin(admin.ModelAdmin):
    list_display = ["name", "stripe_account_id", "created_at"]
    search_fields = ["name", "stripe_account_id"]


@admin.register(PaymentTransaction)
class PaymentTransactionAdmin(ReadOnlyAdmin):
    list_display = ["id", "seller", "amount", "currency", "release_date", "payed_out",
                    "actual_release_date"]
    list_filter = ["payed_out", "currency"]
    search_fields = ["seller__name", "seller__stripe_account_id"]
    list_select_related = ["seller"]
    raw_id_fields = ["seller"]


@admin.register(PaymentTransfer)
class PaymentTransferAdmin(ReadOnlyAdmin):
    list_display = ["id", "stripe_transfer_id", "payment_transaction", "amount", "status"]
    list_filter = ["status"]
    search_fields = ["stripe_transfer_id"]
    raw_id_fields = ["payment_transaction"]


class PayoutItemInline(ReadOnlyInline):
    model = PayoutItem
    raw_id_fields = ["payment_transfer"]


@admin.register(Payout)
class PayoutAdmin(ReadOnlyAdmin):
    list_display = ["stripe_payout_id", "seller", "amount", "currency", "status", "failure_code",
                    "arrival_date", "last_event_type", "last_event_created", "updated_at"]
    list_filter = ["status", "failure_code", "currency"]
    search_fields = ["stripe_payout_id", "seller__name", "seller__stripe_account_id"]
    list_select_related = ["seller"]
    raw_id_fields = ["seller"]
    inlines = [PayoutItemInline]


class AttemptInline(ReadOnlyInline):
    model = WebhookEventAttempt
    fields = ["started_at", "trigger", "requested_by", "worker", "outcome", "reason",
              "status_after", "error"]
    readonly_fields = fields


@admin.register(WebhookEvent)
class WebhookEventAdmin(ReadOnlyAdmin):
    list_display = ["stripe_event_id", "type", "status", "status_reason", "account",
                    "stripe_object_id", "stripe_created", "attempts", "next_attempt_at",
                    "received_at"]
    list_filter = ["status", "type", "livemode"]
    search_fields = ["stripe_event_id", "stripe_object_id", "account"]
    date_hierarchy = "received_at"
    actions = ["replay_selected"]
    inlines = [AttemptInline]
    readonly_fields = ["stripe_event_id", "type", "account", "livemode", "api_version",
                       "stripe_created", "stripe_object_id", "body", "headers", "received_at",
                       "status", "status_reason", "attempts", "next_attempt_at", "claimed_by",
                       "last_error", "processed_at"]
    exclude = ["raw_body"]

    class Media:
        css = {"all": ["console/admin.css"]}  # the body's wrapping: no inline style (CSP)

    @admin.display(description="body (as received)")
    def body(self, obj: WebhookEvent) -> str:
        return format_html('<pre class="payload">{}</pre>',
                           selectors.event_payload_pretty(obj))

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("payouts.replay_webhookevent")

    @admin.action(description="Replay selected events", permissions=["replay"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet[WebhookEvent]) -> None:
        outcomes: dict[str, int] = {}
        for event_id in queryset.values_list("pk", flat=True):
            outcome = event_replay(event_id=event_id, requested_by=request.user)  # type: ignore[arg-type]
            outcomes[outcome.kind] = outcomes.get(outcome.kind, 0) + 1
        summary = ", ".join(f"{count} {kind}" for kind, count in sorted(outcomes.items()))
        self.message_user(request, f"Replayed: {summary}", messages.SUCCESS)


@admin.register(WebhookEventAttempt)
class WebhookEventAttemptAdmin(ReadOnlyAdmin):
    list_display = ["event", "trigger", "requested_by", "outcome", "reason", "status_after",
                    "started_at"]
    list_filter = ["trigger", "outcome"]
    search_fields = ["event__stripe_event_id"]
    list_select_related = ["event", "requested_by"]


@admin.register(WebhookRejection)
class WebhookRejectionAdmin(ReadOnlyAdmin):
    list_display = ["reason", "count", "last_seen_at"]


@admin.register(TransactionLog)
class TransactionLogAdmin(ReadOnlyAdmin):
    list_display = ["started_at", "operation", "isolation_level", "attempts", "sqlstates",
                    "duration_ms", "outcome", "event", "payout"]
    list_filter = ["outcome", "isolation_level", "operation"]
    search_fields = ["operation", "event__stripe_event_id", "payout__stripe_payout_id"]
    list_select_related = ["event", "payout"]


@admin.register(ScheduledJob)
class ScheduledJobAdmin(ReadOnlyAdmin):
    list_display = ["name", "leased_by", "lease_until", "last_finished_at"]


@admin.register(JobRun)
class JobRunAdmin(ReadOnlyAdmin):
    list_display = ["job", "trigger", "requested_by", "status", "scope", "apply", "started_at",
                    "finished_at", "runner"]
    list_filter = ["job", "trigger", "status"]
    list_select_related = ["requested_by"]
    date_hierarchy = "started_at"


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["at", "actor_name", "action", "target", "outcome"]
    list_filter = ["action"]
    search_fields = ["target", "actor_name"]


@admin.register(BulkReplay)
class BulkReplayAdmin(ReadOnlyAdmin):
    list_display = ["id", "requested_at", "requested_by", "description", "status", "done",
                    "total", "decided_by"]
    list_filter = ["status"]
    list_select_related = ["requested_by", "decided_by"]


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    list_display = ["rule", "subject", "summary", "opened_at", "resolved_at", "notified_open_at",
                    "notified_resolved_at", "delivery_attempts"]
    list_filter = ["rule"]
    date_hierarchy = "opened_at"
