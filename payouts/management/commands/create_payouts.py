"""Pay sellers their released money: resume unfinished payouts, then create new ones."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from payouts.models import Seller
from payouts.services import seller_payouts
from payouts.services.seller_payouts import PayoutStillPending, PayoutStillReserved
from payouts.stripe_api import StripeNotConfigured, stripe_client


class Command(BaseCommand):
    help = ("Create Stripe transfers and payouts for sellers' released transactions, exactly "
            "once; unfinished payouts from an earlier run are finished first.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--seller", help="only this connected account (acct_…)")
        parser.add_argument("--dry-run", action="store_true",
                            help="show what would be paid; change nothing, call nothing")

    def handle(self, *args: Any, seller: str | None, dry_run: bool, **options: Any) -> None:
        only = None
        if seller:
            only = Seller.objects.filter(stripe_account_id=seller).first()
            if only is None:
                raise CommandError(f"no seller with account {seller}")
        today = timezone.localdate()
        if dry_run:
            self._dry_run(only, today)
            return
        try:
            client = stripe_client()
        except StripeNotConfigured as exc:
            raise CommandError(str(exc)) from exc

        pending: list[str] = []
        for payout in seller_payouts.resumable_payouts(only):
            self._submit(payout, client, pending, resumed=True)
        for balance_seller in {b.seller for b in seller_payouts.eligible_balances(today, only)}:
            try:
                reserved = seller_payouts.payout_reserve(seller=balance_seller, as_of=today)
            except PayoutStillReserved as exc:  # its resume above did not finish
                self.stderr.write(f"not paid now: {exc}")
                continue
            for payout in reserved:
                self._submit(payout, client, pending, resumed=False)
        if pending:
            raise CommandError(f"{len(pending)} payout(s) could not be finished and stay "
                               f"reserved; run again to resume: {', '.join(pending)}")

    def _submit(self, payout: Any, client: Any, pending: list[str], *, resumed: bool) -> None:
        try:
            done = seller_payouts.payout_submit(payout=payout, client=client)
        except PayoutStillPending as exc:
            pending.append(payout.reference)
            self.stderr.write(f"still pending: {exc}")
            return
        verb = "resumed" if resumed else "created"
        if done.creation_state == done.Creation.FAILED:
            self.stdout.write(f"{done.reference} failed at Stripe, transactions released: "
                              f"{done.creation_error}")
        else:
            self.stdout.write(f"{verb} {done.reference} → {done.stripe_payout_id}: "
                              f"{done.amount / 100:,.2f} {done.currency.upper()} to "
                              f"{done.seller.stripe_account_id}")

    def _dry_run(self, only: Seller | None, today: Any) -> None:
        resumable = list(seller_payouts.resumable_payouts(only))
        for payout in resumable:
            self.stdout.write(f"would resume {payout.reference} ({payout.amount / 100:,.2f} "
                              f"{payout.currency.upper()} to {payout.seller.stripe_account_id})")
        balances = seller_payouts.eligible_balances(today, only)
        for b in balances:
            if any(p.seller_id == b.seller.pk for p in resumable):
                self.stdout.write(f"would not pay {b.seller.stripe_account_id} more until its "
                                  "reserved payout is finished")
                continue
            self.stdout.write(f"would pay {b.amount / 100:,.2f} {b.currency.upper()} to "
                              f"{b.seller.stripe_account_id} ({b.seller.name}, "
                              f"{b.transactions} transactions)")
        if not resumable and not balances:
            self.stdout.write("nothing to pay")
