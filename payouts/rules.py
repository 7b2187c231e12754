"""The thresholds shared by Health's verdict (console/verdict.py) and the alerts
(payouts/services/alerts.py): one place per rule, so the page and the pager agree."""

from __future__ import annotations

from django.conf import settings


def too_many_dead(dead: int) -> bool:
    """Dead events: retries exhausted, only a person moves them (ALERT_DEAD_EVENTS, 0)."""
    return dead > settings.ALERT_DEAD_EVENTS


def any_held(held: int) -> bool:
    """Held events disagree with our ledger: a person decides."""
    return held > 0


def oldest_due_too_old(age_s: float | None) -> bool:
    """The workers are not keeping up (HEALTH_OLDEST_DUE_SECONDS)."""
    return age_s is not None and age_s > settings.HEALTH_OLDEST_DUE_SECONDS


def any_to_review(to_review: int) -> bool:
    """Payouts marked for a person, by the ledger's rules or by reconciliation."""
    return to_review > 0


def p99_too_slow(p99_s: float | None) -> bool:
    return p99_s is not None and p99_s > settings.HEALTH_P99_SECONDS


def failure_rate_too_high(failed: int, rate: float) -> bool:
    """Payout failures of one code or seller in the window (ALERT_FAILURE_MIN_COUNT,
    ALERT_FAILURE_RATE): both, so one failure of a seller's one payout is not a page."""
    return failed >= settings.ALERT_FAILURE_MIN_COUNT and rate >= settings.ALERT_FAILURE_RATE


def rejection_burst(count: int) -> bool:
    """Refusals of one reason within ALERT_REJECTION_WINDOW_MINUTES (ALERT_REJECTIONS)."""
    return count >= settings.ALERT_REJECTIONS


JOB_OVERDUE_INTERVALS = 3  # a scheduled job is overdue after this many of its intervals
