"""Compare our payouts with Stripe's; with --apply, bring drifted ones to Stripe's state."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from payouts.models import JobRun
from payouts.services import jobs
from payouts.services.stripe_sync import Drift
from payouts.stripe_api import StripeNotConfigured, stripe_client


class Command(BaseCommand):
    help = ("Compare status, amount, currency, arrival date and failure code of every payout "
            "not final, marked for review or changed in the last 7 days with GET "
            "/v1/payouts/{id}. Prints one line per drifted payout. Exit 0: nothing drifted; "
            "1: some did (or Stripe lacks them); 2: the run failed or some payouts could not be "
            "checked. With --apply, each drifted "
            "payout takes Stripe's state through the processor (a resync event).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--apply", action="store_true",
                            help="bring drifted payouts to Stripe's state (held when amount "
                                 "or currency differ); without it nothing is written but the "
                                 "run's record")

    def handle(self, *args: Any, apply: bool, **options: Any) -> None:
        try:
            stripe_client()
        except StripeNotConfigured as exc:
            raise CommandError(str(exc), returncode=2) from exc
        run = jobs.reconcile_payouts(apply=apply, trigger=JobRun.Trigger.COMMAND,
                                     tick=jobs.Progress(self.stderr.write))
        for finding in run.findings:
            fields = {k: tuple(v) for k, v in finding.pop("fields").items()}
            self.stdout.write(Drift(**finding, fields=fields).line())
        counts = run.counts
        self.stdout.write(f"reconcile_payouts: checked {counts['checked']}, drifted "
                          f"{counts['drifted']}, missing at Stripe {counts['missing']}"
                          + (f", applied {counts['applied']}, not applied "
                             f"{counts['not_applied']}" if apply else "")
                          + (f", errors {counts['errors']}" if counts["errors"] else ""))
        if run.error or run.status in (JobRun.Status.FAILED, JobRun.Status.ABANDONED):
            self.stderr.write(run.error)
            raise CommandError(f"the run {run.status}: not every payout was checked",
                               returncode=2)
        if run.status == JobRun.Status.DRIFTED:
            raise CommandError("some payouts differ from Stripe's", returncode=1)
