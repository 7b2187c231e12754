"""Evaluate the alert rules once and deliver what is due (the workers do it every minute)."""

from typing import Any

import structlog
from django.core.management.base import BaseCommand, CommandError

from payouts.services import alerts

log = structlog.get_logger(__name__)


class Command(BaseCommand):
    help = ("Evaluate every alert rule once: open an alert for each condition found (once), "
            "resolve those no longer found (once), and deliver their notifications to "
            "ALERT_WEBHOOK_URL and ALERT_EMAILS. Prints one line per open alert. Exit 0: none "
            "open; 1: some open; 2: the rules could not be evaluated.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = alerts.check(alerts.Evaluation())
        except Exception as exc:
            log.exception("alerts.check_failed")
            raise CommandError(f"the alerts could not be evaluated: {type(exc).__name__}: "
                               f"{exc}", returncode=2) from exc
        for alert in result.open:
            subject = f" [{alert.subject}]" if alert.subject else ""
            self.stdout.write(f"{alert.rule}{subject}: {alert.summary} (open since "
                              f"{alert.opened_at:%Y-%m-%d %H:%M:%S} UTC)")
        for error in result.delivery_errors:
            self.stderr.write(f"not delivered, retried later: {error}")
        counts = result.counts()
        self.stdout.write(f"check_alerts: {counts['open']} open, {counts['opened']} opened, "
                          f"{counts['resolved']} resolved, {counts['delivered']} delivered, "
                          f"{counts['delivery_failed']} deliveries failed")
        if result.open:
            raise CommandError(f"{len(result.open)} alert(s) open", returncode=1)
