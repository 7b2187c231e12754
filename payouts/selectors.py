"""Reads for the console: one function per question, aggregated in the database."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.core.cache import cache
from django.db import connection
from django.db.models import (
    Case,
    Count,
    F,
    IntegerField,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.utils import timezone

from payouts.models import (
    AuditEntry,
    BulkReplay,
    Payout,
    PayoutItem,
    Seller,
    TransactionLog,
    WebhookEvent,
    WebhookEventAttempt,
    WebhookRejection,
)


def payout_list() -> QuerySet[Payout]:
    return Payout.objects.select_related("seller")


def payouts_created_here() -> QuerySet[Payout]:
    """Payouts this console created (create_payouts), newest first."""
    return (Payout.objects.exclude(creation_state="").select_related("seller")
            .order_by("-created_at"))


def payout_details() -> QuerySet[Payout]:
    """Payouts with what their detail page shows besides: the reversed and the reversals."""
    return Payout.objects.select_related("seller", "original_payout").prefetch_related("reversals")


def payout_by_stripe_id(stripe_payout_id: str) -> Payout | None:
    if not stripe_payout_id:
        return None
    return Payout.objects.filter(stripe_payout_id=stripe_payout_id).first()


def payout_items(payout: Payout) -> QuerySet[PayoutItem]:
    return (PayoutItem.objects.filter(payout=payout).order_by("id")
            .select_related("payment_transfer__payment_transaction"))


def payout_timeline(payout: Payout) -> QuerySet[WebhookEvent]:
    """Every event for the payout in Stripe ``created`` order, with attempts and logs."""
    if not payout.stripe_payout_id:
        return WebhookEvent.objects.none()
    return (WebhookEvent.objects.filter(stripe_object_id=payout.stripe_payout_id)
            .order_by("stripe_created", "id")
            .defer("raw_body")
            .prefetch_related(
                Prefetch("attempts_log",
                         queryset=WebhookEventAttempt.objects.select_related("requested_by")),
                Prefetch("transaction_logs",
                         queryset=TransactionLog.objects.order_by("started_at")),
            ))


# Events a replay can still change: applied, skipped and ignored ones are settled.
REPLAYABLE = (WebhookEvent.Status.RECEIVED, WebhookEvent.Status.FAILED, WebhookEvent.Status.DEAD,
              WebhookEvent.Status.HELD)
PERSON_TRIGGERS = (WebhookEventAttempt.Trigger.REPLAY, WebhookEventAttempt.Trigger.DISMISS)


def event_list() -> QuerySet[WebhookEvent]:
    """Events with what the list shows beside them: their seller (by connected account),
    how many attempts they have on record, and the last thing a person did to them.
    Subqueries, so they run for the page's rows only."""
    seller = Seller.objects.filter(stripe_account_id=OuterRef("account"))
    attempts = WebhookEventAttempt.objects.filter(event=OuterRef("pk"))
    by_person = attempts.filter(trigger__in=PERSON_TRIGGERS).order_by("-finished_at", "-id")
    return WebhookEvent.objects.defer("raw_body", "headers").annotate(
        seller_name=Subquery(seller.values("name")[:1]),
        payout_pk=Subquery(Payout.objects.filter(stripe_payout_id=OuterRef("stripe_object_id"))
                           .values("pk")[:1]),
        attempt_rows=Subquery(attempts.order_by().values("event").annotate(n=Count("id"))
                              .values("n"), output_field=IntegerField()),
        person_action=Subquery(by_person.values("trigger")[:1]),
        person_outcome=Subquery(by_person.values("outcome")[:1]),
        person_at=Subquery(by_person.values("finished_at")[:1]),
        person_name=Subquery(by_person.values("requested_by__username")[:1]),
    )


def _distinct(table: str, column: str, where: str = "TRUE") -> list[str]:
    """The distinct values of an indexed column, one index probe per value (a loose index
    scan): milliseconds over millions of rows, where SELECT DISTINCT reads them all.
    ``table``, ``column`` and ``where`` are this module's own constants, never input."""
    table, column = connection.ops.quote_name(table), connection.ops.quote_name(column)
    with connection.cursor() as cursor:
        cursor.execute(f"""
            WITH RECURSIVE v(value) AS (
                SELECT min({column}) FROM {table} WHERE {where}
                UNION ALL
                SELECT (SELECT min({column}) FROM {table} WHERE {where} AND {column} > v.value)
                FROM v WHERE v.value IS NOT NULL
            )
            SELECT value FROM v WHERE value IS NOT NULL""")
        return [row[0] for row in cursor.fetchall()]


def event_types() -> list[str]:
    """The event types on record, for the events list's filter."""
    return _distinct(WebhookEvent._meta.db_table, "type")


def event_payload_pretty(event: WebhookEvent) -> str:
    """The stored body, indented for reading (as received if it is somehow not JSON)."""
    text = bytes(event.raw_body).decode("utf-8", errors="replace")
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def event_attempts(event: WebhookEvent) -> QuerySet[WebhookEventAttempt]:
    return event.attempts_log.select_related("requested_by").order_by("started_at", "id")


def failed_event_count() -> int:
    return WebhookEvent.objects.filter(status=WebhookEvent.Status.FAILED).count()


def failure_codes_present() -> list[str]:
    """The failure codes payouts have, for the payouts list's filter."""
    return _distinct(Payout._meta.db_table, "failure_code", "\"failure_code\" <> ''")


def held_event_count() -> int:
    return WebhookEvent.objects.filter(status=WebhookEvent.Status.HELD).count()


def payouts_to_review() -> QuerySet[Payout]:
    """Payouts marked for a person (and reconciliation), oldest mark first."""
    return (Payout.objects.exclude(review_reason="").select_related("seller")
            .order_by("review_requested_at"))


# --- the audit trail -------------------------------------------------------------------


def audit_entries() -> QuerySet[AuditEntry]:
    """Newest first; the payout's id for the link beside an event's."""
    return AuditEntry.objects.select_related("payout").order_by("-at", "-id")


def audit_actor_names() -> list[str]:
    """Everyone who appears in the audit trail (kept by name if their user is deleted)."""
    return _distinct(AuditEntry._meta.db_table, "actor_name")


# --- transaction logs ----------------------------------------------------------------

WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7),
           "30d": timedelta(days=30)}


@dataclass(frozen=True)
class OperationStats:
    operation: str
    transactions: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    retry_rate: float  # share of transactions that needed more than one attempt
    serialization_failures: int  # 40001 seen, over all attempts
    deadlocks: int  # 40P01 seen
    failed: int  # not committed in the end


def transaction_stats(since: datetime) -> list[OperationStats]:
    table = TransactionLog._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT operation, count(*),
                   percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms),
                   avg((attempts > 1)::int),
                   coalesce(sum(cardinality(array_positions(sqlstates, '40001'))), 0),
                   coalesce(sum(cardinality(array_positions(sqlstates, '40P01'))), 0),
                   count(*) FILTER (WHERE outcome <> 'committed')
            FROM {table}
            WHERE started_at >= %s
            GROUP BY operation
            ORDER BY count(*) DESC
            """,
            [since],
        )
        return [
            OperationStats(op, n, pct[0], pct[1], pct[2], float(retry), int(ser), int(dead),
                           failed)
            for op, n, pct, retry, ser, dead, failed in cursor.fetchall()
        ]


def transaction_operations() -> list[str]:
    """The distinct operation names, for the transaction logs' filter."""
    return _distinct(TransactionLog._meta.db_table, "operation")


# --- health ----------------------------------------------------------------------------


def payouts_by_status() -> list[dict[str, Any]]:
    """Payouts per status and currency; a reversed payout counts as "reversed", and the
    reversals themselves (bookkeeping of the payout they reverse) are left out."""
    shown = Case(When(reversed_at__isnull=False, then=Value("reversed")), default=F("status"))
    rows = (Payout.objects.filter(original_payout__isnull=True).order_by()
            .values("currency", shown_status=shown)
            .annotate(count=Count("id"), amount=Sum("amount")).order_by("shown_status", "currency"))
    return [{"status": row["shown_status"], "currency": row["currency"], "count": row["count"],
             "amount": row["amount"]} for row in rows]


LEDGER_SUMMARY_TTL_S = 60


@dataclass(frozen=True)
class LedgerSummary:
    """Health's aggregates over every payout (status totals, sellers' failure rates over
    30 days): full scans at scale (about 200 ms at 1 M payouts), so computed at most
    once a minute per process and shown with the time they were computed."""

    by_status: list[dict[str, Any]]
    seller_failures: list[dict[str, Any]]
    computed_at: datetime


def ledger_summary() -> LedgerSummary:
    summary = cache.get("payouts.ledger_summary")
    if summary is None:
        now = timezone.now()
        summary = LedgerSummary(payouts_by_status(), seller_failure_rates(now - timedelta(days=30)),
                                computed_at=now)
        cache.set("payouts.ledger_summary", summary, LEDGER_SUMMARY_TTL_S)
    return summary  # type: ignore[no-any-return]


def failure_codes(since: datetime) -> list[dict[str, Any]]:
    """Failed payouts per failure code, as a share of the payouts created in the window."""
    total = Payout.objects.filter(created_at__gte=since).count() or 1
    rows = (Payout.objects.filter(created_at__gte=since, status=Payout.Status.FAILED)
            .order_by().values("failure_code").annotate(count=Count("id")).order_by("-count"))
    return [{**row, "rate": row["count"] / total} for row in rows]


def seller_failure_rates(since: datetime, limit: int | None = 10) -> list[dict[str, Any]]:
    rows = (Payout.objects.filter(created_at__gte=since, seller__isnull=False).order_by()
            .values("seller__name", "seller__stripe_account_id")
            .annotate(total=Count("id"), failed=Count("id", filter=Q(status="failed")))
            .filter(failed__gt=0).order_by("-failed", "-total")[:limit])
    return [{**row, "rate": row["failed"] / row["total"]} for row in rows]


def stuck(now: datetime | None = None, grace: timedelta = timedelta(0)) -> Q:
    """In transit past their arrival date (plus ``grace``: the alert waits longer than
    Health): Stripe has not said paid or failed. ``now``: Health reads every figure at
    one moment."""
    return Q(status=Payout.Status.IN_TRANSIT, arrival_date__lt=(now or timezone.now()) - grace)


def payouts_stuck(now: datetime | None = None, grace: timedelta = timedelta(0),
                  ) -> QuerySet[Payout]:
    return Payout.objects.filter(stuck(now, grace))


def stuck_in_transit(limit: int = 20, now: datetime | None = None) -> tuple[int, list[Payout]]:
    stuck = payouts_stuck(now)
    return stuck.count(), list(stuck.select_related("seller").order_by("arrival_date")[:limit])


@dataclass(frozen=True)
class Attention:
    """What waits for a person, counted: the navigation's badge and the Needs attention page."""

    failed: int
    dead: int
    held: int
    to_review: int  # drifted from Stripe, or otherwise marked
    stuck: int
    approvals: int  # bulk replays waiting for a second Support person

    @property
    def total(self) -> int:
        return (self.failed + self.dead + self.held + self.to_review + self.stuck
                + self.approvals)


NEEDS_A_PERSON = (WebhookEvent.Status.FAILED, WebhookEvent.Status.DEAD, WebhookEvent.Status.HELD)


ATTENTION_KEY, ATTENTION_TTL_S = "payouts.attention", 5


def attention_recent() -> Attention:
    """The counts as of at most a few seconds ago, in this process: every console page
    draws the badge, and counting costs some 20 ms at a million payouts (bench)."""
    counts = cache.get(ATTENTION_KEY)
    return counts if counts is not None else attention()  # type: ignore[no-any-return]


def attention() -> Attention:
    """The counts now (and kept for ``attention_recent``)."""
    by_status = dict(WebhookEvent.objects.filter(status__in=NEEDS_A_PERSON).order_by()
                     .values_list("status").annotate(n=Count("id")))
    counts = Attention(failed=by_status.get(WebhookEvent.Status.FAILED, 0),
                       dead=by_status.get(WebhookEvent.Status.DEAD, 0),
                       held=by_status.get(WebhookEvent.Status.HELD, 0),
                       to_review=payouts_to_review().count(),
                       stuck=payouts_stuck().count(),
                       approvals=pending_approvals().count())
    cache.set(ATTENTION_KEY, counts, ATTENTION_TTL_S)
    return counts


def events_needing_a_person() -> QuerySet[WebhookEvent]:
    """Held first (a decision), then dead (retries exhausted), then failed; newest first."""
    order = Case(When(status=WebhookEvent.Status.HELD, then=0),
                 When(status=WebhookEvent.Status.DEAD, then=1), default=2)
    return event_list().filter(status__in=NEEDS_A_PERSON).order_by(order, "-received_at")


@dataclass(frozen=True)
class Backlog:
    pending: int  # received or failed, waiting for (re)processing
    due: int  # of those, due now
    oldest_due_age_s: float | None
    dead: int
    held: int  # disagree with our ledger: a person decides


def events_due(now: datetime, events: QuerySet[WebhookEvent] | None = None,
               ) -> QuerySet[WebhookEvent]:
    """Waiting for (re)processing and due: Health's backlog and the events filter alike."""
    events = WebhookEvent.objects.all() if events is None else events
    return events.filter(status__in=WebhookEvent.PENDING, next_attempt_at__lte=now)


def event_backlog(now: datetime | None = None) -> Backlog:
    now = now or timezone.now()
    pending = WebhookEvent.objects.filter(status__in=WebhookEvent.PENDING)
    due = events_due(now)
    oldest = due.order_by("received_at").values_list("received_at", flat=True).first()
    return Backlog(
        pending=pending.count(), due=due.count(),
        oldest_due_age_s=(now - oldest).total_seconds() if oldest else None,
        dead=WebhookEvent.objects.filter(status=WebhookEvent.Status.DEAD).count(),
        held=held_event_count(),
    )


def rejections() -> QuerySet[WebhookRejection]:
    return WebhookRejection.objects.order_by("-count")


def processing_latency(since: datetime) -> dict[str, float] | None:
    """Seconds from receipt to a final outcome, for events settled in the window."""
    table = WebhookEvent._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT count(*), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                   (ORDER BY extract(epoch FROM processed_at - received_at))
            FROM {table} WHERE processed_at >= %s
            """,
            [since],
        )
        count, pct = cursor.fetchone()
    if not count:
        return None
    return {"count": count, "p50": pct[0], "p95": pct[1], "p99": pct[2]}


def retries_over_time(since: datetime) -> list[dict[str, Any]]:
    """Per hour since ``since`` (empty hours included): transactions, retries (extra
    attempts) and deadlocks seen."""
    table = TransactionLog._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH hours AS (
                SELECT generate_series(date_trunc('hour', %(since)s::timestamptz),
                                       date_trunc('hour', now()), interval '1 hour') AS at
            ), seen AS (
                SELECT date_trunc('hour', started_at) AS at, count(*) AS n,
                       sum(attempts - 1) AS retries,
                       sum(cardinality(array_positions(sqlstates, '40P01'))) AS deadlocks
                FROM {table} WHERE started_at >= %(since)s GROUP BY 1
            )
            SELECT hours.at, coalesce(n, 0), coalesce(retries, 0), coalesce(deadlocks, 0)
            FROM hours LEFT JOIN seen USING (at) ORDER BY hours.at
            """,
            {"since": since},
        )
        return [{"at": at, "transactions": n, "retries": int(r), "deadlocks": int(d)}
                for at, n, r, d in cursor.fetchall()]


# --- bulk replays ------------------------------------------------------------------------


def pending_approvals() -> QuerySet[BulkReplay]:
    """Bulk replays waiting for a second Support person's approval, oldest first."""
    return (BulkReplay.objects.filter(status=BulkReplay.Status.AWAITING_APPROVAL)
            .select_related("requested_by").defer("event_ids").order_by("requested_at", "id"))


def bulk_replays_recent(limit: int = 20) -> QuerySet[BulkReplay]:
    """The latest bulk replays, newest first (without their long list of events)."""
    return (BulkReplay.objects.select_related("requested_by", "decided_by")
            .defer("event_ids").order_by("-requested_at", "-id")[:limit])
