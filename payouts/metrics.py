"""Prometheus metrics (GET /metrics, console/metrics.py).

Two kinds, chosen by where the truth is:

* **Counted as things happen**, by the process they happen in: deliveries by result,
  transaction retries by SQLSTATE, and the processing-time histogram. Under gunicorn
  every worker process counts its own; with ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn
  sets a private one up, console/gunicorn_conf.py) each process keeps its values in a
  file there and a scrape, answered by any one worker, adds them all up
  (prometheus-client's multiprocess mode). A worker (``process_webhooks``) on the same
  machine with the same ``PROMETHEUS_MULTIPROC_DIR`` is added in too. Kept in memory
  and files, not in the database: a write per delivery on a shared row is what the
  rejection counter was built to avoid (docs/benchmarks.md, *flood*).
* **Read from the database at scrape time**: the backlog, payouts by status, payouts
  stuck, open alerts: the same for every process and every machine. The whole-table
  totals (events and payouts by status) come from a one-minute cache, like Health's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from django.core.cache import cache
from django.db import transaction
from django.db.models import Count
from django.utils import timezone
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

import txutils

disable_created_metrics()  # the *_created series: noise for every scrape

DELIVERIES = Counter("payout_console_webhook_deliveries",
                     "Webhook deliveries answered, by result (received, duplicate, rejected, "
                     "unavailable) and, when rejected, the reason", ["result", "reason"])
TRANSACTION_RETRIES = Counter("payout_console_transaction_retries",
                              "Whole-transaction retries (txutils), by the SQLSTATE that "
                              "caused each", ["sqlstate"])
# Receipt to the first final outcome (applied, skipped, ignored, held), as Health's latency.
PROCESSING_SECONDS = Histogram(
    "payout_console_event_processing_seconds",
    "Seconds from an event's receipt to its settlement (applied, skipped, ignored or held)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600,
             72 * 3600))


# The usual series exist from the start (at 0), so a rate over them is defined at once.
for _result in ("received", "duplicate"):
    DELIVERIES.labels(result=_result, reason="")
for _code in txutils.RETRYABLE_SQLSTATES:
    TRANSACTION_RETRIES.labels(sqlstate=_code)


def delivery(result: str, reason: str = "") -> None:
    DELIVERIES.labels(result=result, reason=reason).inc()


def count_retries(record: txutils.TransactionRecord) -> None:
    """A txutils sink: the SQLSTATEs of the attempts that were retried (an attempt whose
    failure ended the transaction was not)."""
    for code in record.sqlstates[:len(record.retry_delays)]:
        TRANSACTION_RETRIES.labels(sqlstate=code).inc()


def settled_after(seconds: float) -> None:
    """An event settled ``seconds`` after its receipt, counted once its transaction
    commits (a retried or rolled-back attempt, or a preview, counts nothing)."""
    transaction.on_commit(lambda: PROCESSING_SECONDS.observe(max(seconds, 0.0)))


# --- the scrape --------------------------------------------------------------------------

EVENT_COUNTS_TTL_S = 60


def _event_counts() -> dict[str, int]:
    """Events per status: the queue's statuses live (small, indexed), the settled ones
    from a count over the whole table made at most once a minute per process."""
    from payouts.models import WebhookEvent

    totals: dict[str, int] | None = cache.get("payouts.event_status_counts")
    if totals is None:
        totals = dict(WebhookEvent.objects.order_by().values_list("status")
                      .annotate(n=Count("id")))
        cache.set("payouts.event_status_counts", totals, EVENT_COUNTS_TTL_S)
    live = (*WebhookEvent.PENDING, WebhookEvent.Status.DEAD, WebhookEvent.Status.HELD)
    now = dict(WebhookEvent.objects.filter(status__in=live).order_by().values_list("status")
               .annotate(n=Count("id")))
    counts = {status: totals.get(status, 0) for status in WebhookEvent.Status.values}
    counts.update({status: now.get(status, 0) for status in live})
    return counts


class DatabaseFigures:
    """The gauges read from the database at each scrape (a prometheus-client collector)."""

    def collect(self) -> Iterator[Metric]:
        from payouts import selectors
        from payouts.models import Alert
        from payouts.services import alerts

        now = timezone.now()
        events = GaugeMetricFamily("payout_console_webhook_events",
                                   "Stored events by status", labels=["status"])
        for status, count in _event_counts().items():
            events.add_metric([status], count)
        yield events
        backlog = selectors.event_backlog(now)
        yield GaugeMetricFamily("payout_console_webhook_oldest_due_seconds",
                                "How long the oldest event due for processing has waited "
                                "(0: none due)", value=backlog.oldest_due_age_s or 0.0)
        payouts = GaugeMetricFamily("payout_console_payouts",
                                    "Payouts by status (reversed ones as reversed; reversals "
                                    "left out), as of the one-minute summary",
                                    labels=["status"])
        by_status: dict[str, int] = {}
        for row in selectors.ledger_summary().by_status:
            by_status[row["status"]] = by_status.get(row["status"], 0) + row["count"]
        for status, count in sorted(by_status.items()):
            payouts.add_metric([status], count)
        yield payouts
        yield GaugeMetricFamily("payout_console_payouts_stuck_in_transit",
                                "Payouts in transit past their arrival date",
                                value=selectors.payouts_stuck(now).count())
        open_alerts = dict(Alert.objects.filter(Alert.OPEN).order_by()
                           .values_list("rule").annotate(n=Count("id")))
        gauge = GaugeMetricFamily("payout_console_alerts_open", "Open alerts by rule",
                                  labels=["rule"])
        for rule in alerts.RULES:
            gauge.add_metric([rule], open_alerts.get(rule, 0))
        yield gauge


def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def exposition() -> bytes:
    """The text format: this process's (or, in multiprocess mode, every process's)
    counters and histogram, then the database's gauges."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        counted = generate_latest(registry)
    else:
        counted = generate_latest(REGISTRY)
    figures = CollectorRegistry()
    figures.register(DatabaseFigures())  # type: ignore[arg-type]
    return counted + generate_latest(figures)


