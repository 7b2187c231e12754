"""Alerts: each rule's condition, opened once, kept open while it holds, resolved once,
and told to people by a webhook (Slack-compatible) and e-mail.

``check()`` is the alert job (``manage.py check_alerts``, and every ALERT_CHECK_MINUTES in
a worker, payouts/services/jobs.py): it reads every rule's figures, opens an ``Alert`` for
each (rule, subject) found that has none open, resolves the open ones no longer found, then
delivers the notifications due. Every write is one autocommit statement and deliveries
happen after them, with short timeouts: nothing here holds a ledger lock or waits inside
a transaction. Thresholds shared with Health are in ``payouts.rules``.

Two evaluators at once (a worker's schedule and a person's ``check_alerts``) open an alert
once: the partial unique index allows one open alert per (rule, subject) and the insert
updates the open one instead. A notification is sent by whichever claims it first (a
short lease on ``next_delivery_at``); one that fails is retried at later checks, with
backoff, and the channels it already reached are not sent it again.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.core.mail import send_mail
from django.db import connection
from django.db.models import Count, Q, Sum
from django.utils import timezone

from payouts import rules, selectors
from payouts.models import Alert, JobRun, RejectionMinute, WebhookEvent

log = structlog.get_logger(__name__)

# Every rule, as people read it (the Health page, the messages, the metrics' labels).
RULES = {
    "dead_events": "events are dead (ALERT_DEAD_EVENTS)",
    "held_events": "events are held for a decision",
    "oldest_due": "the oldest due event waits too long (HEALTH_OLDEST_DUE_SECONDS)",
    "stuck_in_transit": "payouts in transit past their arrival date plus "
                        "ALERT_STUCK_GRACE_HOURS",
    "failures_by_code": "payouts fail with one failure code (ALERT_FAILURE_RATE, "
                        "ALERT_FAILURE_MIN_COUNT over ALERT_FAILURE_WINDOW_HOURS)",
    "failures_by_seller": "one seller's payouts fail (ALERT_FAILURE_RATE, "
                          "ALERT_FAILURE_MIN_COUNT over ALERT_FAILURE_WINDOW_HOURS)",
    "rejection_burst": "deliveries refused for one reason (ALERT_REJECTIONS within "
                       "ALERT_REJECTION_WINDOW_MINUTES)",
    "reconcile_drift": "the last reconcile_payouts run found payouts drifted from Stripe",
    "to_review": "payouts are marked to review",
    "api_version": "events arrive with another API version than STRIPE_API_VERSION",
    "job_overdue": f"a scheduled job has not finished a run for {rules.JOB_OVERDUE_INTERVALS} "
                   "of its intervals",
}

ALERT = Alert._meta.db_table
CLAIM_FOR = timedelta(minutes=2)  # while one evaluator delivers, others leave it alone
RETRY_FIRST = timedelta(minutes=1)  # then doubling, up to RETRY_MAX
RETRY_MAX = timedelta(hours=1)
REJECTION_MINUTES_KEPT = timedelta(days=1)


@dataclass(frozen=True)
class Finding:
    """A rule's condition holding now, for one subject."""

    rule: str
    subject: str
    value: float | None
    summary: str


def _many(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# --- the rules -------------------------------------------------------------------------------


def findings(now: datetime) -> list[Finding]:
    """Every rule's conditions holding at ``now``. Raises if a figure cannot be read: an
    alert is resolved only by a reading that says so, never by a missing one."""
    backlog = selectors.event_backlog(now)
    found: list[Finding] = []
    if rules.too_many_dead(backlog.dead):
        found.append(Finding("dead_events", "", backlog.dead, _many(backlog.dead, "dead event")))
    if rules.any_held(backlog.held):
        found.append(Finding("held_events", "", backlog.held, _many(backlog.held, "held event")))
    if rules.oldest_due_too_old(backlog.oldest_due_age_s):
        age = backlog.oldest_due_age_s or 0.0
        found.append(Finding("oldest_due", "", age, f"the oldest of {backlog.due} due events "
                             f"has waited {age / 60:.0f} min"))
    grace = timedelta(hours=settings.ALERT_STUCK_GRACE_HOURS)
    stuck = selectors.payouts_stuck(now, grace).count()
    if stuck:
        found.append(Finding("stuck_in_transit", "", stuck,
                             f"{_many(stuck, 'payout')} in transit more than "
                             f"{settings.ALERT_STUCK_GRACE_HOURS:g} h past the arrival date"))
    found += _failures(now)
    found += _rejection_bursts(now)
    found += _reconcile_drift()
    to_review = selectors.payouts_to_review().count()
    if rules.any_to_review(to_review):
        found.append(Finding("to_review", "", to_review, f"{_many(to_review, 'payout')} to review"))
    found += _other_api_versions(now)
    found += _overdue_jobs(now)
    return found


def _failures(now: datetime) -> list[Finding]:
    hours = settings.ALERT_FAILURE_WINDOW_HOURS
    since = now - timedelta(hours=hours)
    found = []
    for row in selectors.failure_codes(since):
        if rules.failure_rate_too_high(row["count"], row["rate"]):
            code = row["failure_code"] or "(none)"
            found.append(Finding("failures_by_code", code, row["rate"],
                                 f"{_many(row['count'], 'payout')} failed with {code} in "
                                 f"{hours:g} h: {row['rate']:.0%} of the payouts created"))
    for row in selectors.seller_failure_rates(since, limit=None):
        if rules.failure_rate_too_high(row["failed"], row["rate"]):
            found.append(Finding("failures_by_seller", row["seller__stripe_account_id"],
                                 row["rate"], f"{row['seller__name']}: {row['failed']} of "
                                 f"{row['total']} payouts failed in {hours:g} h "
                                 f"({row['rate']:.0%})"))
    return found


def _rejection_bursts(now: datetime) -> list[Finding]:
    minutes = settings.ALERT_REJECTION_WINDOW_MINUTES
    since = (now - timedelta(minutes=minutes)).replace(second=0, microsecond=0)
    rows = (RejectionMinute.objects.filter(minute__gte=since).order_by().values("reason")
            .annotate(n=Sum("count")).order_by("reason"))
    found = []
    for row in rows:
        if rules.rejection_burst(row["n"]):
            hint = (": a rotated webhook secret? (STRIPE_WEBHOOK_SECRET)"
                    if row["reason"] == "bad_signature" else "")
            found.append(Finding("rejection_burst", row["reason"], row["n"],
                                 f"{_many(row['n'], 'delivery')} refused as {row['reason']} "
                                 f"in {minutes} min{hint}"))
    return found


def _reconcile_drift() -> list[Finding]:
    last = (JobRun.objects.filter(job=JobRun.Job.RECONCILE_PAYOUTS, scope="")
            .exclude(status=JobRun.Status.RUNNING).order_by("-started_at").first())
    if last is None or last.status != JobRun.Status.DRIFTED:
        return []
    drifted = int(last.counts.get("drifted", 0)) + int(last.counts.get("missing", 0))
    return [Finding("reconcile_drift", "", drifted,
                    f"reconcile_payouts of {last.started_at:%Y-%m-%d %H:%M} UTC: "
                    f"{_many(drifted, 'payout')} drifted from Stripe or missing there")]


def _other_api_versions(now: datetime) -> list[Finding]:
    hours = settings.ALERT_API_VERSION_HOURS
    ours = settings.STRIPE_API_VERSION
    rows = (WebhookEvent.objects.filter(received_at__gte=now - timedelta(hours=hours))
            .exclude(api_version="").exclude(api_version=ours).order_by()
            .values("api_version").annotate(n=Count("id")).order_by("api_version"))
    return [Finding("api_version", row["api_version"], row["n"],
                    f"{_many(row['n'], 'event')} in {hours:g} h with API version "
                    f"{row['api_version']}, not {ours} (STRIPE_API_VERSION)") for row in rows]


def _overdue_jobs(now: datetime) -> list[Finding]:
    from payouts.services import jobs  # jobs runs this module

    found = []
    for name, interval in jobs.intervals().items():
        if name == jobs.CHECK_ALERTS:
            continue  # if it does not run, nothing reads this rule anyway
        runs = JobRun.objects.filter(job=name).exclude(trigger=JobRun.Trigger.CONSOLE)
        done = (runs.filter(status__in=[JobRun.Status.OK, JobRun.Status.DRIFTED])
                .order_by("-started_at").values_list("finished_at", flat=True).first())
        # Never finished: counted from its first try (a job never tried is not late yet).
        since = done or runs.order_by("started_at").values_list("started_at", flat=True).first()
        if since is None or now - since <= rules.JOB_OVERDUE_INTERVALS * interval:
            continue
        hours = (now - since).total_seconds() / 3600
        found.append(Finding("job_overdue", name, hours,
                             f"{name} has not finished a run for {hours:.1f} h (it runs every "
                             f"{interval.total_seconds() / 60:g} min)"))
    return found


# --- opening and resolving -----------------------------------------------------------------

# One statement: a new alert, or the open one of (rule, subject) brought up to date.
# ``xmax = 0`` only on a row this statement inserted.
UPSERT_SQL = f"""
INSERT INTO {ALERT} AS a (rule, subject, summary, value, opened_at, last_seen_at,
                          delivered_to, delivery_attempts, last_error)
VALUES (%(rule)s, %(subject)s, %(summary)s, %(value)s, %(now)s, %(now)s, '[]', 0, '')
ON CONFLICT (rule, subject) WHERE resolved_at IS NULL
DO UPDATE SET summary = EXCLUDED.summary, value = EXCLUDED.value,
              last_seen_at = EXCLUDED.last_seen_at
RETURNING id, (xmax = 0)"""
RESOLVE_SQL = f"""
UPDATE {ALERT} SET resolved_at = %(now)s WHERE id = %(id)s AND resolved_at IS NULL
RETURNING id"""
# A notification is sent by the evaluator that claims it (a short lease).
CLAIM_SQL = f"""
UPDATE {ALERT} SET next_delivery_at = %(until)s
WHERE id = %(id)s AND (next_delivery_at IS NULL OR next_delivery_at <= %(now)s)
RETURNING id"""


def _execute(sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@dataclass
class Evaluation:
    """What one check did."""

    opened: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    open: list[Alert] = field(default_factory=list)
    delivered: int = 0
    delivery_errors: list[str] = field(default_factory=list)
    done: bool = False

    def counts(self) -> dict[str, int]:
        return {"open": len(self.open), "opened": len(self.opened),
                "resolved": len(self.resolved), "delivered": self.delivered,
                "delivery_failed": len(self.delivery_errors)}

    def findings(self) -> list[dict[str, Any]]:
        return [{"rule": a.rule, "subject": a.subject, "summary": a.summary,
                 "opened_at": a.opened_at.isoformat()} for a in self.open]

    def problems(self) -> str:
        return "; ".join(self.delivery_errors)


def evaluate(now: datetime, result: Evaluation) -> None:
    """Open, update and resolve alerts from what the rules find at ``now``."""
    found = {(f.rule, f.subject[:200]): f for f in findings(now)}  # as the column keeps it
    for (rule, subject), finding in found.items():
        [(alert_id, inserted)] = _execute(UPSERT_SQL, {
            "rule": rule, "subject": subject, "summary": finding.summary,
            "value": finding.value, "now": now})
        if inserted:
            result.opened.append(f"{finding.rule} {finding.subject}".strip())
            log.warning("alert.opened", alert=alert_id, rule=finding.rule,
                        subject=finding.subject, summary=finding.summary)
    for alert in open_alerts():
        if (alert.rule, alert.subject) not in found and _execute(
                RESOLVE_SQL, {"id": alert.pk, "now": now}):
            result.resolved.append(f"{alert.rule} {alert.subject}".strip())
            log.info("alert.resolved", alert=alert.pk, rule=alert.rule, subject=alert.subject)
    RejectionMinute.objects.filter(minute__lt=now - REJECTION_MINUTES_KEPT).delete()


def open_alerts() -> list[Alert]:
    return list(Alert.objects.filter(Alert.OPEN).order_by("opened_at", "id"))


def check(result: Evaluation, now: datetime | None = None) -> Evaluation:
    """The alert job: evaluate, then deliver what is due. A delivery that fails is kept
    for a later check; the evaluation stands."""
    now = now or timezone.now()
    evaluate(now, result)
    deliver_due(now, result)
    result.open = open_alerts()
    result.done = True
    return result


# --- telling people ----------------------------------------------------------------------------


def channels() -> list[str]:
    return [name for name, configured in (("webhook", settings.ALERT_WEBHOOK_URL),
                                          ("email", settings.ALERT_EMAILS)) if configured]


def message(alert: Alert, kind: str) -> tuple[str, str]:
    """The notification's subject line and text."""
    what = f"{alert.rule}{f' ({alert.subject})' if alert.subject else ''}"
    if kind == "open":
        title = f"[payout console] ALERT {what}: {alert.summary}"
        body = (f"{title}\nRule: {RULES.get(alert.rule, alert.rule)}.\n"
                f"Open since {alert.opened_at:%Y-%m-%d %H:%M:%S} UTC.")
    else:
        assert alert.resolved_at is not None
        lasted = (alert.resolved_at - alert.opened_at).total_seconds() / 60
        title = f"[payout console] RESOLVED {what}"
        body = (f"{title}\nOpen {alert.opened_at:%Y-%m-%d %H:%M} to "
                f"{alert.resolved_at:%H:%M} UTC ({lasted:.0f} min); last seen: {alert.summary}.")
    return title, body


def _send(channel: str, title: str, body: str) -> None:
    timeout = settings.ALERT_TIMEOUT_SECONDS
    if channel == "webhook":
        request = urllib.request.Request(
            settings.ALERT_WEBHOOK_URL, data=json.dumps({"text": body}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1024)  # urlopen raises on 4xx/5xx
    else:
        send_mail(title, body, settings.DEFAULT_FROM_EMAIL, settings.ALERT_EMAILS,
                  fail_silently=False)


def retry_delay(attempts: int) -> timedelta:
    return min(RETRY_MAX, RETRY_FIRST * 2 ** max(attempts - 1, 0))


def pending_notifications(now: datetime) -> list[Alert]:
    """Alerts whose opening or resolution is still to be told, due now, oldest first."""
    return list(Alert.objects.filter(
        Q(notified_open_at__isnull=True)
        | Q(resolved_at__isnull=False, notified_resolved_at__isnull=True))
        .filter(Q(next_delivery_at__isnull=True) | Q(next_delivery_at__lte=now))
        .order_by("opened_at", "id"))


def deliver_due(now: datetime, result: Evaluation) -> None:
    wanted = channels()
    for alert in pending_notifications(now):
        if not _execute(CLAIM_SQL, {"id": alert.pk, "now": now, "until": now + CLAIM_FOR}):
            continue  # another evaluator is sending it
        alert.refresh_from_db()
        _deliver(alert, wanted, now, result)


def _deliver(alert: Alert, wanted: list[str], now: datetime, result: Evaluation) -> None:
    """Send the alert's notifications in hand (its opening, then its resolution) to every
    channel not reached yet; keep what reached where, and when to try again."""
    while True:
        kind = ("open" if alert.notified_open_at is None
                else "resolved" if alert.resolved_at and not alert.notified_resolved_at
                else None)
        if kind is None:
            break
        title, body = message(alert, kind)
        errors = []
        for channel in wanted:
            if channel in alert.delivered_to:
                continue
            try:
                _send(channel, title, body)
                alert.delivered_to = [*alert.delivered_to, channel]
                result.delivered += 1
            except Exception as exc:  # any failure of a receiver: kept, retried later
                errors.append(f"{channel}: {type(exc).__name__}: {str(exc)[:300]}")
        if errors:
            alert.delivery_attempts += 1
            alert.next_delivery_at = now + retry_delay(alert.delivery_attempts)
            alert.last_error = "; ".join(errors)
            result.delivery_errors += [f"{alert.rule} {kind}: {e}" for e in errors]
            log.warning("alert.delivery_failed", alert=alert.pk, rule=alert.rule, kind=kind,
                        attempts=alert.delivery_attempts, errors=errors,
                        next_at=alert.next_delivery_at.isoformat())
            break
        setattr(alert, "notified_open_at" if kind == "open" else "notified_resolved_at", now)
        alert.delivered_to, alert.delivery_attempts, alert.last_error = [], 0, ""
        alert.next_delivery_at = None
        log.info("alert.notified", alert=alert.pk, rule=alert.rule, kind=kind, channels=wanted)
    alert.save(update_fields=["notified_open_at", "notified_resolved_at", "delivered_to",
                              "delivery_attempts", "next_delivery_at", "last_error"])
