"""List the payout events Stripe has and we lack, and process them (reads only)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from payouts.models import JobRun
from payouts.services import jobs
from payouts.services.stripe_sync import SYNC_MAX_DAYS
from payouts.stripe_api import StripeNotConfigured, stripe_client


class Command(BaseCommand):
    help = ("List payout.* events from Stripe's Events API for the platform and every seller's "
            "connected account, and process each one not stored yet, as a delivery would be. "
            "Only reads Stripe. Exit 2 when the run failed (bad key, Stripe unreachable).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=3,
                            help=f"how far back to list (1-{SYNC_MAX_DAYS}; Stripe keeps "
                                 "events 30 days)")

    def handle(self, *args: Any, days: int, **options: Any) -> None:
        if not 1 <= days <= SYNC_MAX_DAYS:  # before a run is recorded
            raise CommandError(f"--days must be 1 to {SYNC_MAX_DAYS}: Stripe keeps events "
                               f"{SYNC_MAX_DAYS} days")
        try:
            stripe_client()
        except StripeNotConfigured as exc:
            raise CommandError(str(exc), returncode=2) from exc
        run = jobs.sync_events(days=days, trigger=JobRun.Trigger.COMMAND,
                               tick=jobs.Progress(self.stderr.write))
        for account in run.findings:
            name = account["account"] or "platform"
            if account["error"]:
                self.stderr.write(f"{name}: not listed: {account['error']}")
                continue
            self.stdout.write(
                f"{name}: listed {account['listed']}, new {account['new']}, applied "
                f"{account['applied']}, held {account['held']}, waiting {account['waiting']}, "
                f"unchanged {account['unchanged']}"
                + (f", malformed {account['malformed']}" if account["malformed"] else ""))
        totals = run.counts
        self.stdout.write(f"sync_events: {totals['accounts']} account(s), listed "
                          f"{totals['listed']}, new {totals['new']}, applied {totals['applied']}, "
                          f"held {totals['held']}, waiting {totals['waiting']}"
                          + (f", accounts not listed {totals['errors']}"
                             if totals["errors"] else ""))
        if run.status != JobRun.Status.OK:
            listed_errors = "; ".join(a["error"] for a in run.findings if a["error"])
            if run.error != listed_errors:  # it stopped before the end: say why
                self.stderr.write(run.error)
            raise CommandError(f"the run {run.status}: not every account was listed",
                               returncode=2)
