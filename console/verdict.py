"""Health's verdict: the rules that say whether the payout system needs a person, in one place.

``read_figures()`` reads what the rules look at, at one moment; ``evaluate()`` applies the
rules to it and returns every check (the Health page shows each card's own state) and
the verdict: "All clear", "Needs attention" or "Degraded", with the findings that set it.
A "Needs attention" page or an alert can call the same two functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum

from django.conf import settings
from django.urls import reverse

from payouts import rules, selectors
from payouts.models import Payout


class Level(IntEnum):
    OK = 0
    WARN = 1  # a person should look
    DEGRADED = 2  # the system is not keeping up

    @property
    def css(self) -> str:
        return self.name.lower()

    @property
    def title(self) -> str:
        """The page's verdict."""
        return {Level.OK: "All clear", Level.WARN: "Needs attention",
                Level.DEGRADED: "Degraded"}[self]

    @property
    def label(self) -> str:
        """One check's state."""
        return "OK" if self is Level.OK else self.title


@dataclass(frozen=True)
class Check:
    """One rule applied: its level, what it found (``summary``) and where to see it."""

    key: str  # "dead_events": the Health card and the tests find it by this
    level: Level
    rule: str  # the threshold, e.g. "needs attention when any event is dead"
    summary: str  # what was found, e.g. "3 dead events"
    url: str  # the list that shows exactly what it counted
    count: int | None  # rows behind ``url``; None when the check is not a count


@dataclass(frozen=True)
class Figures:
    """What the rules look at, read at ``at``."""

    at: datetime
    backlog: selectors.Backlog
    stuck_count: int
    stuck: list[Payout]  # the first few, oldest arrival date first
    to_review: int
    latency: dict[str, float] | None  # receipt → final outcome over 24 h; None: no events


@dataclass(frozen=True)
class Verdict:
    level: Level
    checks: dict[str, Check]  # every check, by key

    @property
    def findings(self) -> list[Check]:
        """The checks past their threshold, worst first."""
        return sorted((c for c in self.checks.values() if c.level), key=lambda c: -c.level)


STUCK_SHOWN = 5  # payouts listed on the card; "View all" lists the rest


def read_figures(now: datetime) -> Figures:
    stuck_count, stuck = selectors.stuck_in_transit(limit=STUCK_SHOWN, now=now)
    return Figures(at=now, backlog=selectors.event_backlog(now), stuck_count=stuck_count,
                   stuck=stuck, to_review=selectors.payouts_to_review().count(),
                   latency=selectors.processing_latency(now - timedelta(hours=24)))


def evaluate(figures: Figures) -> Verdict:
    """The rules, from ``payouts.rules`` (shared with the alerts). Thresholds:
    HEALTH_OLDEST_DUE_SECONDS, HEALTH_P99_SECONDS, ALERT_DEAD_EVENTS (settings)."""
    backlog = figures.backlog
    events, payouts = reverse("event-list"), reverse("payout-list")
    oldest_due_limit = settings.HEALTH_OLDEST_DUE_SECONDS
    p99_limit = settings.HEALTH_P99_SECONDS
    p99 = figures.latency["p99"] if figures.latency else None
    oldest = backlog.oldest_due_age_s
    checks = [
        Check("oldest_due", Level.DEGRADED if rules.oldest_due_too_old(oldest) else Level.OK,
              f"degraded when the oldest due event waits over {duration(oldest_due_limit)}",
              f"{backlog.due} due, the oldest waiting {duration(oldest)}" if oldest is not None
              else "nothing due", f"{events}?queue=due", backlog.due),
        Check("dead_events", _warn_if(rules.too_many_dead(backlog.dead)),
              "needs attention when any event is dead" if not settings.ALERT_DEAD_EVENTS
              else f"needs attention when over {settings.ALERT_DEAD_EVENTS} events are dead",
              _many(backlog.dead, "dead event"), f"{events}?status=dead", backlog.dead),
        Check("held_events", _warn_if(rules.any_held(backlog.held)),
              "needs attention when any event is held for a decision",
              _many(backlog.held, "held event"), f"{events}?status=held", backlog.held),
        Check("stuck_in_transit", _warn_if(figures.stuck_count),
              "needs attention when any payout is in transit past its arrival date",
              f"{_many(figures.stuck_count, 'payout')} stuck in transit",
              f"{payouts}?flag=stuck", figures.stuck_count),
        Check("to_review", _warn_if(rules.any_to_review(figures.to_review)),
              "needs attention when any payout is marked to review",
              f"{_many(figures.to_review, 'payout')} to review", f"{payouts}?flag=review",
              figures.to_review),
        Check("latency_p99", Level.WARN if rules.p99_too_slow(p99) else Level.OK,
              f"needs attention when processing p99 is over {duration(p99_limit)} (24 h)",
              f"p99 {duration(p99)}" if p99 is not None else "no events settled in 24 h",
              # the slowest transactions: where a slow p99 usually comes from
              f"{reverse('transaction-logs')}?window=24h&sort=-duration_ms", None),
    ]
    return Verdict(level=max(c.level for c in checks), checks={c.key: c for c in checks})


def duration(seconds: float | None) -> str:
    """"1 s", "0.35 s", "42 s", "12 min", "3.5 h": for a card, not for arithmetic."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + " s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _warn_if(found: int | bool) -> Level:
    return Level.WARN if found else Level.OK


def _many(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"

