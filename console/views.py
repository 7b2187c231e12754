"""The staff console. Views check permissions, call one selector or service, render.

Pages work without JavaScript for reading; with htmx, filters, sorting and
pages swap only the results (the address bar kept true with hx-push-url), and
a replay swaps its table row in place.
"""

from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import django_tables2 as tables
import structlog
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.db.models import QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    HttpResponseRedirect,
    QueryDict,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString
from django.views.decorators.http import require_GET, require_POST
from django_htmx.middleware import HtmxDetails
from django_tables2 import RequestConfig
from django_tables2.export import ExportMixin, TableExport

from console import charts, reconciliation, verdict
from console.filters import AuditFilter, EventFilter, PayoutFilter, TransactionLogFilter
from console.inputs import configure_table, safe_next
from console.tables import AuditTable, EventTable, PayoutTable, TransactionLogTable
from payouts import selectors
from payouts.models import (
    AuditEntry,
    BulkReplay,
    JobRun,
    Payout,
    Seller,
    TransactionLog,
    WebhookEvent,
)
from payouts.services import alerts, audit, bulk_replay, inbox, jobs, preview, seller_payouts
from payouts.services.processing import event_replay
from payouts.stripe_api import StripeNotConfigured, stripe_client

log = structlog.get_logger(__name__)

SELECTION_LIMIT = 500  # ticked boxes per bulk replay: a selection is a page or a few

# How a replay's outcome is shown: green only when it did what was asked, or there was
# nothing to do; amber when it waits (retry) or for a person (held); red when it failed.
OUTCOME_LEVEL = {"applied": "success", "skipped": "info", "ignored": "info", "retry": "warning",
                 "held": "warning", "failed": "error"}
MESSAGE_LEVEL = {"success": messages.SUCCESS, "info": messages.INFO,
                 "warning": messages.WARNING, "error": messages.ERROR}


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def _page(request: HtmxHttpRequest, template: str, context: dict[str, Any],
          partial: str = "results") -> HttpResponse:
    """The whole page, or for htmx only the part it swaps."""
    if request.htmx and not request.htmx.history_restore_request:
        template = f"{template}#{partial}"
    return render(request, template, context)


@require_GET
@login_required
def home(request: HttpRequest) -> HttpResponse:
    """Each role lands where its work is: Support (who replay) on what needs a person,
    Managers on health."""
    if request.user.has_perm("payouts.replay_webhookevent"):
        return redirect("attention")
    if request.user.has_perm("payouts.view_health"):
        return redirect("health")
    if request.user.has_perm("payouts.view_payout"):
        return redirect("payout-list")
    return render(request, "console/home.html")  # signed in, but no role yet


ATTENTION_ROWS = 20


@require_GET
@login_required
@permission_required("payouts.view_webhookevent", raise_exception=True)
def attention_page(request: HtmxHttpRequest) -> HttpResponse:
    """Needs attention: held, dead and failed events, payouts to review, payouts stuck."""
    events = EventTable.for_attention(selectors.events_needing_a_person()[:ATTENTION_ROWS])
    RequestConfig(request, paginate=False).configure(events)
    stuck = PayoutTable(selectors.payouts_stuck().select_related("seller")
                        .order_by("arrival_date")[:ATTENTION_ROWS], orderable=False,
                        attrs={"class": "table", "id": "stuck-table"})
    to_review = PayoutTable(selectors.payouts_to_review()[:ATTENTION_ROWS], orderable=False,
                            extra_columns=[("review_reason", tables.Column("Why to review"))],
                            attrs={"class": "table", "id": "review-table"})
    for table in (stuck, to_review):
        RequestConfig(request, paginate=False).configure(table)
    counts = selectors.attention()
    return render(request, "console/attention.html", {
        "counts": counts, "attention": counts, "events": events, "stuck": stuck,
        "to_review": to_review, "rows": ATTENTION_ROWS,
        "approvals": selectors.pending_approvals(), "open_alerts": alerts.open_alerts(),
    })


def _audit_table(request: HttpRequest, entries: QuerySet[AuditEntry]) -> AuditTable:
    """What people did to one event or payout: the audit page's table, unpaged."""
    table = AuditTable(entries[:50], orderable=False)
    RequestConfig(request, paginate=False).configure(table)
    return table


# --- payouts -------------------------------------------------------------------------------


@require_GET
@login_required
@permission_required("payouts.view_payout", raise_exception=True)
def payout_list(request: HtmxHttpRequest) -> HttpResponse:
    filters = PayoutFilter(request.GET, queryset=selectors.payout_list(),
                           failure_codes=selectors.failure_codes_present())
    table = PayoutTable(filters.qs)
    configure_table(request, table)
    return _page(request, "console/payouts.html", {"filter": filters, "table": table})


@require_GET
@login_required
@permission_required("payouts.view_payout", raise_exception=True)
def payout_detail(request: HttpRequest, pk: int) -> HttpResponse:
    payout = get_object_or_404(selectors.payout_details(), pk=pk)
    return render(request, "console/payout_detail.html", {
        "payout": payout,
        "audit": _audit_table(request, selectors.audit_entries().filter(payout=payout)),
        "items": selectors.payout_items(payout),
        "timeline": selectors.payout_timeline(payout).select_related("requested_by"),
        "stripe_configured": bool(settings.STRIPE_API_KEY),
    })


@require_POST
@login_required
@permission_required("payouts.replay_webhookevent", raise_exception=True)
def payout_resync_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Resync from Stripe: compare the payout with Stripe's and, if it drifted, bring it
    to Stripe's state through the processor (a resync event on its timeline)."""
    payout = get_object_or_404(Payout.objects.select_related("seller"), pk=pk,
                               stripe_payout_id__isnull=False)
    back = HttpResponseRedirect(reverse("payout-detail", args=[pk]), status=303)
    try:
        stripe_client()  # refuse before recording a run that cannot start
    except StripeNotConfigured as exc:
        messages.error(request, f"{payout}: not resynced. {exc}")
        log.info("console.payout_resynced", user=request.user.get_username(),
                 payout=str(payout), status="not_configured")
        return back
    before = audit.payout_state(payout)
    run = jobs.reconcile_payouts(apply=True, trigger=JobRun.Trigger.CONSOLE,
                                 requested_by=request.user,  # type: ignore[arg-type]
                                 payouts=[payout])
    audit.record(audit.Action.RESYNC, actor=request.user,  # type: ignore[arg-type]
                 target=payout.stripe_payout_id or str(payout), outcome=run.status,
                 detail=run.error or "; ".join(reconciliation.resync_lines(run)),
                 payout=payout, before=before)
    if run.status == JobRun.Status.OK:
        messages.success(request, f"{payout} matches Stripe: nothing to change.")
    elif run.status == JobRun.Status.DRIFTED:
        for line in reconciliation.resync_lines(run):
            messages.warning(request, line)
    else:
        messages.error(request, f"{payout}: resync {run.status}. {run.error}")
    log.info("console.payout_resynced", user=request.user.get_username(), payout=str(payout),
             status=run.status, run=run.pk)
    return back


# --- creating payouts ----------------------------------------------------------------------


@require_GET
@login_required
@permission_required("payouts.view_payout", raise_exception=True)
def seller_payouts_page(request: HttpRequest) -> HttpResponse:
    return render(request, "console/seller_payouts.html", {
        "balances": seller_payouts.eligible_balances(),
        "resumable": seller_payouts.resumable_payouts().order_by("created_at"),
        "recent": selectors.payouts_created_here()[:20],
    })


@require_POST
@login_required
def payout_resume_view(request: HttpRequest, pk: int) -> HttpResponse:
    if not request.user.is_superuser:  # money leaves the platform: superusers only
        return HttpResponseForbidden("Only superusers may resume a payout.")
    payout = get_object_or_404(Payout, pk=pk, creation_state=Payout.Creation.RESERVED)
    try:
        done = seller_payouts.payout_resume(payout_id=payout.pk)
        messages.success(request, f"{done.reference}: {done.get_creation_state_display()}")
    except (seller_payouts.PayoutStillPending, StripeNotConfigured) as exc:
        messages.error(request, str(exc))
    log.info("console.payout_resumed", user=request.user.get_username(), payout=payout.pk)
    return redirect("seller-payouts")


# --- events --------------------------------------------------------------------------------


def _event_table(request: HttpRequest, queryset: QuerySet[WebhookEvent]) -> EventTable:
    """The events list's table; without checkboxes for those who may not replay."""
    may_replay = request.user.has_perm("payouts.replay_webhookevent")
    table = EventTable(queryset, exclude=() if may_replay else ("select",))
    configure_table(request, table)
    return table


@require_GET
@login_required
@permission_required("payouts.view_webhookevent", raise_exception=True)
def event_list(request: HtmxHttpRequest) -> HttpResponse:
    filters = EventFilter(request.GET, queryset=selectors.event_list(),
                          types=selectors.event_types())
    return _page(request, "console/events.html", {
        "filter": filters,
        "table": _event_table(request, filters.qs),
        "failed_count": selectors.failed_event_count(),
        "held_count": selectors.held_event_count(),
    })


@require_GET
@login_required
@permission_required("payouts.view_webhookevent", raise_exception=True)
def event_detail(request: HttpRequest, pk: int) -> HttpResponse:
    event = get_object_or_404(WebhookEvent.objects.select_related("requested_by"), pk=pk)
    kept_until = event.kept_by_stripe_until
    return render(request, "console/event_detail.html", {
        "event": event,
        "audit": _audit_table(request, selectors.audit_entries().filter(event=event)),
        "kept_until": kept_until,
        "kept_past": kept_until is not None and kept_until <= timezone.now(),
        "payload": selectors.event_payload_pretty(event),
        "attempts": list(selectors.event_attempts(event)),
        "transaction_logs": event.transaction_logs.order_by("started_at"),
        "payout": selectors.payout_by_stripe_id(event.stripe_object_id),
        "pending": event.status in WebhookEvent.PENDING,
        "settled": event.status in WebhookEvent.SETTLED,
        "replayable": event.status in selectors.REPLAYABLE,
        "seller": Seller.objects.filter(stripe_account_id=event.account).first()
        if event.account else None,
        "gives_up_at": inbox.gives_up_at(event.received_at),
        "max_attempts": settings.WEBHOOK_MAX_ATTEMPTS,
    })


@require_POST
@login_required
@permission_required("payouts.replay_webhookevent", raise_exception=True)
def event_replay_view(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    event = get_object_or_404(WebhookEvent, pk=pk)
    outcome = event_replay(event_id=event.pk, requested_by=request.user)  # type: ignore[arg-type]
    said = (f"{event.stripe_event_id} replayed: {outcome.kind}, now {outcome.status_after}. "
            f"{outcome.reason}")
    if request.htmx:
        # The row, redrawn with who replayed it and the outcome; the message and the
        # counts (navigation badge, the list's toolbar) swapped out of band.
        # The row as the page it is on draws it (Needs attention shows fewer columns).
        replayed = selectors.event_list().filter(pk=event.pk)
        on_attention = urlsplit(request.POST.get("next", "")).path == reverse("attention")
        table = (EventTable.for_attention(replayed) if on_attention
                 else _event_table(request, replayed))
        RequestConfig(request, paginate=False).configure(table)  # cells see perms and csrf
        counts = selectors.attention()
        return render(request, "console/_replayed_row.html", {
            "row": table.rows[0], "table": table, "replayed": outcome, "oob": True,
            "said": said, "level": OUTCOME_LEVEL.get(outcome.kind, "warning"),
            "on_attention": on_attention, "attention": counts, "counts": counts,
            "failed_count": counts.failed, "held_count": counts.held})
    messages.add_message(request, MESSAGE_LEVEL[OUTCOME_LEVEL.get(outcome.kind, "warning")], said)
    return HttpResponseRedirect(safe_next(request, reverse("event-detail", args=[pk])))


@require_POST
@login_required
@permission_required("payouts.replay_webhookevent", raise_exception=True)
def event_dismiss_view(request: HttpRequest, pk: int) -> HttpResponse:
    """A person decided a held event is not to be applied; the reason is required."""
    event = get_object_or_404(WebhookEvent, pk=pk)
    try:
        inbox.event_dismiss(event_id=event.pk, requested_by=request.user,  # type: ignore[arg-type]
                            reason=request.POST.get("reason", ""))
    except inbox.CannotDismiss as exc:
        messages.error(request, str(exc))
        return HttpResponseRedirect(reverse("event-detail", args=[pk]), status=303)
    messages.success(request, f"{event.stripe_event_id} dismissed: it stays on record as skipped.")
    return HttpResponseRedirect(reverse("event-detail", args=[pk]), status=303)


def _refused(request: HttpRequest, message: str, status: int = 400) -> HttpResponse:
    """A bad input's answer: its status code and a page saying why; nothing was written."""
    log.info("console.refused", user=request.user.get_username(), path=request.path,
             status=status, reason=message)
    return render(request, "console/refused.html", {"message": message}, status=status)


def _posted_ids(request: HttpRequest) -> list[int] | None:
    """The ticked events, or None when a value is not an id."""
    values = request.POST.getlist("event_ids")
    if not all(v.isdigit() for v in values):
        return None
    return [int(v) for v in values]


@require_POST
@login_required
@permission_required("payouts.replay_webhookevent", raise_exception=True)
def event_preview_view(request: HtmxHttpRequest) -> HttpResponse:
    """What replaying the posted events would do, worked out and rolled back. A POST
    (it runs the processor and takes its locks), for the people who may replay."""
    ids = _posted_ids(request)
    if ids is None:
        return _refused(request, "event_ids must be event numbers")
    if not ids:
        return _refused(request, "Select at least one event to preview.")
    if len(ids) > preview.PREVIEW_LIMIT:
        return _refused(request, f"At most {preview.PREVIEW_LIMIT} events can be previewed "
                                 f"at once; {len(ids)} were selected.")
    previews = preview.event_preview(ids)
    if not previews:
        return _refused(request, "None of these events exists.", status=404)
    log.info("console.previewed", user=request.user.get_username(), events=len(previews))
    return _page(request, "console/event_preview.html", {"previews": previews},
                 partial="preview")


def _event_filter_description(filters: EventFilter) -> str:
    """The filter in words, e.g. "status failed, type payout.paid"; "all events"."""
    parts = [f"{(filters.filters[name].label or name).lower()} {value}"
             for name, value in filters.form.cleaned_data.items() if value not in (None, "")]
    return ", ".join(parts) or "all events"


@require_POST
@login_required
@permission_required("payouts.replay_webhookevent", raise_exception=True)
def event_bulk_replay(request: HttpRequest) -> HttpResponse:
    """Ask for a bulk replay, run by the workers: every event matching the events list's
    filter (``query``, its query string), every failed event, or the ticked ones. The
    events are decided now; the job's page shows its progress."""
    scope = request.POST.get("scope", "")
    if scope == "selected":
        ids = _posted_ids(request)
        if ids is None:
            return _refused(request, "event_ids must be event numbers")
        if len(ids) > SELECTION_LIMIT:
            return _refused(request, f"At most {SELECTION_LIMIT} ticked events at once; use "
                                     "Replay all matching for more.")
        event_ids = list(WebhookEvent.objects.filter(pk__in=ids)
                         .order_by("stripe_created", "pk").values_list("pk", flat=True))
        params: dict[str, Any] = {}
        description = f"{len(event_ids)} selected event{'s' if len(event_ids) != 1 else ''}"
    elif scope in ("matching", "failed"):
        query = QueryDict("status=failed" if scope == "failed" else request.POST.get("query", ""))
        filters = EventFilter(query, queryset=selectors.event_list(),
                              types=selectors.event_types())
        if not filters.is_valid():
            errors = "; ".join(f"{field}: {' '.join(messages_)}"
                               for field, messages_ in filters.errors.items())
            return _refused(request, f"The filter is not valid ({errors}).")
        params = {name: query.getlist(name) for name in filters.filters if name in query}
        event_ids = list(filters.qs.order_by("stripe_created", "pk")
                         .values_list("pk", flat=True))
        description = _event_filter_description(filters)
    else:
        return _refused(request, "scope must be selected, matching or failed")
    try:
        job = bulk_replay.bulk_request(requested_by=request.user,  # type: ignore[arg-type]
                                       event_ids=event_ids, filter_params=params,
                                       description=description)
    except bulk_replay.BulkReplayRefused as exc:
        return _refused(request, str(exc), exc.status_code)
    if job.status == BulkReplay.Status.AWAITING_APPROVAL:
        messages.warning(request, f"{job.total} events: more than "
                                  f"{settings.BULK_REPLAY_APPROVAL_THRESHOLD} on a live "
                                  "deployment, so another Support person must approve it.")
    else:
        messages.success(request, f"Bulk replay of {job.total} events queued: the workers "
                                  "replay them one by one.")
    return HttpResponseRedirect(reverse("bulk-replay-detail", args=[job.pk]), status=303)


# --- bulk replays -----------------------------------------------------------------------------


@require_GET
@login_required
@permission_required("payouts.view_webhookevent", raise_exception=True)
def bulk_replay_list(request: HttpRequest) -> HttpResponse:
    return render(request, "console/bulk_replays.html", {
        "jobs": selectors.bulk_replays_recent(),
        "pending": selectors.pending_approvals(),
    })


@require_GET
@login_required
@permission_required("payouts.view_webhookevent", raise_exception=True)
def bulk_replay_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The job and its progress; htmx polls the progress part while it runs."""
    job = get_object_or_404(BulkReplay.objects.select_related("requested_by", "decided_by")
                            .defer("event_ids"), pk=pk)
    return _page(request, "console/bulk_replay.html", {
        "job": job,
        "may_decide": job.requested_by_id != request.user.pk,
    }, partial="progress")


@require_POST
@login_required
@permission_required("payouts.replay_webhookevent", raise_exception=True)
def bulk_replay_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        job = bulk_replay.bulk_cancel(pk, requested_by=request.user)  # type: ignore[arg-type]
    except BulkReplay.DoesNotExist:
        return _refused(request, f"There is no bulk replay {pk}.", status=404)
    except bulk_replay.BulkReplayRefused as exc:
        return _refused(request, str(exc), exc.status_code)
    messages.success(request, f"{job}: canceled." if job.status == BulkReplay.Status.CANCELED
                     else f"{job}: stopping after the events in hand.")
    return HttpResponseRedirect(reverse("bulk-replay-detail", args=[pk]), status=303)


@require_POST
@login_required
@permission_required("payouts.replay_webhookevent", raise_exception=True)
def bulk_replay_decide(request: HttpRequest, pk: int) -> HttpResponse:
    """Four eyes: approve or reject a large live bulk replay, with a reason."""
    decision = request.POST.get("decision", "")
    if decision not in ("approve", "reject"):
        return _refused(request, "decision must be approve or reject")
    try:
        job = bulk_replay.bulk_decide(pk, decided_by=request.user,  # type: ignore[arg-type]
                                      approve=decision == "approve",
                                      reason=request.POST.get("reason", ""))
    except BulkReplay.DoesNotExist:
        return _refused(request, f"There is no bulk replay {pk}.", status=404)
    except bulk_replay.BulkReplayRefused as exc:
        return _refused(request, str(exc), exc.status_code)
    verdict = "approved, queued" if decision == "approve" else "rejected"
    messages.success(request, f"{job}: {verdict}.")
    return HttpResponseRedirect(reverse("bulk-replay-detail", args=[pk]), status=303)


# --- transaction logs -------------------------------------------------------------------------


@require_GET
@login_required
@permission_required("payouts.view_transactionlog", raise_exception=True)
def transaction_logs(request: HtmxHttpRequest) -> HttpResponse:
    window = request.GET.get("window", "24h")
    if window not in selectors.WINDOWS:
        window = "24h"
    since = timezone.now() - selectors.WINDOWS[window]
    queryset = TransactionLog.objects.filter(started_at__gte=since).select_related("event")
    filters = TransactionLogFilter(request.GET, queryset=queryset,
                                   operations=selectors.transaction_operations())
    table = TransactionLogTable(filters.qs)
    configure_table(request, table)
    return _page(request, "console/transaction_logs.html", {
        "filter": filters, "table": table, "window": window, "windows": selectors.WINDOWS,
        "window_param": [("window", window)],
        "stats": selectors.transaction_stats(since),
    })


# --- the audit trail -----------------------------------------------------------------------


@require_GET
@login_required
@permission_required("payouts.view_auditentry", raise_exception=True)
def audit_page(request: HtmxHttpRequest) -> HttpResponse:
    """What people did, filtered; ``?_export=csv`` gives every filtered row as CSV."""
    filters = AuditFilter(request.GET, queryset=selectors.audit_entries())
    table = AuditTable(filters.qs)
    if request.GET.get(ExportMixin.export_trigger_param) == "csv":
        RequestConfig(request, paginate=False).configure(table)  # the page's order, all rows
        log.info("console.audit_exported", user=request.user.get_username(),
                 rows=len(table.rows))
        return TableExport("csv", table).response(f"audit-{timezone.now():%Y%m%d-%H%M%S}.csv")
    configure_table(request, table)
    export = request.GET.copy()
    export.pop(table.prefixed_page_field, None)
    export[ExportMixin.export_trigger_param] = "csv"
    return _page(request, "console/audit.html", {
        "filter": filters, "table": table, "export_query": export.urlencode()})


# --- reconciliation with Stripe ------------------------------------------------------------


@require_GET
@login_required
@permission_required("payouts.view_payout", raise_exception=True)
def reconciliation_page(request: HttpRequest) -> HttpResponse:
    return render(request, "console/reconciliation.html", {
        "runs": reconciliation.last_runs(),
        "found": reconciliation.reconciliation(),
        "to_review": selectors.payouts_to_review().count(),
        "stripe_configured": bool(settings.STRIPE_API_KEY),
    })


# --- health --------------------------------------------------------------------------------


@require_GET
@login_required
@permission_required("payouts.view_health", raise_exception=True)
def health(request: HtmxHttpRequest) -> HttpResponse:
    """Every live figure is read at ``now`` (shown as the page's "as of"); the whole-ledger
    totals come from a summary computed at most once a minute and show their own time."""
    now = timezone.now()
    figures = verdict.read_figures(now)
    hourly = selectors.retries_over_time(now - timedelta(hours=23))
    summary = selectors.ledger_summary()

    def chart(key: str, unit: str, empty: str) -> SafeString:
        return charts.hourly_chart([(p["at"], p[key]) for p in hourly], unit=unit, empty=empty)

    return _page(request, "console/health.html", {
        "verdict": verdict.evaluate(figures),
        "open_alerts": alerts.open_alerts(),
        "by_status": summary.by_status,
        "summary_at": summary.computed_at,
        "failure_codes": selectors.failure_codes(now - timedelta(days=30)),
        "seller_failures": summary.seller_failures,
        "stuck_count": figures.stuck_count,
        "stuck": figures.stuck,
        "backlog": figures.backlog,
        "to_review": figures.to_review,
        "latency": figures.latency,
        "sync_jobs": reconciliation.last_run_of_each_job(),
        "stripe_configured": bool(settings.STRIPE_API_KEY),
        "rejections": selectors.rejections(),
        "transactions_chart": chart("transactions", "transactions per hour",
                                    "No transactions in the last 24 hours."),
        "retries_chart": chart("retries", "retries per hour",
                               "No retries in the last 24 hours: every transaction committed "
                               "on its first attempt."),
        "deadlocks_chart": chart("deadlocks", "deadlocks per hour",
                                 "No deadlocks in the last 24 hours."),
        "generated_at": now,
    }, partial="health-panels")
