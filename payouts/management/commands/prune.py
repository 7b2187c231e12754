"""Delete what the retention settings let go: old transaction logs, and old settled events."""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from payouts.models import JobRun
from payouts.services import jobs


class Command(BaseCommand):
    help = ("Delete transaction logs older than RETENTION_TXLOG_DAYS and, only when "
            "RETENTION_EVENT_DAYS is set, settled events (processed, skipped, ignored) older "
            "than that with their attempts, in short batches. Workers run it daily.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true",
                            help="count what would be deleted, delete nothing")

    def handle(self, *args: Any, dry_run: bool, **options: Any) -> None:
        run = jobs.prune(trigger=JobRun.Trigger.COMMAND, dry_run=dry_run,
                         tick=jobs.Progress(self.stderr.write))
        verb = "would delete" if dry_run else "deleted"
        counts = run.counts
        self.stdout.write(f"transaction logs older than {settings.RETENTION_TXLOG_DAYS} days: "
                          f"{verb} {counts['transaction_logs']}")
        if settings.RETENTION_EVENT_DAYS is None:
            self.stdout.write("events: kept (RETENTION_EVENT_DAYS is not set)")
        else:
            self.stdout.write(f"settled events older than {settings.RETENTION_EVENT_DAYS} days: "
                              f"{verb} {counts['events']}, with {counts['attempts']} attempts")
        if run.status != JobRun.Status.OK:  # what it deleted before stopping is counted above
            raise CommandError(f"prune {run.status}: {run.error}", returncode=2)
