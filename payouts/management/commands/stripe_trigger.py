"""Post a realistic, signed payout event to a running console, like `stripe trigger`.

A payout we know lends the event its amount, currency, account and metadata; each
can be overridden, to show what the processor does with an event that disagrees.
"""

import time
import urllib.error
import urllib.request
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from payouts import stripe_events
from payouts.models import Payout


class Command(BaseCommand):
    help = "Send a signed Stripe payout event to the webhook endpoint (for demos and load)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("type", choices=stripe_events.PAYOUT_EVENT_TYPES)
        parser.add_argument("--payout", help="po_… id; a payout in the database lends its "
                            "amount, currency and account (default: a new payout id)")
        parser.add_argument("--account", help="acct_… of the connected account")
        parser.add_argument("--amount", type=int, help="in minor units (default: our payout's)")
        parser.add_argument("--currency", help="e.g. usd (default: our payout's)")
        parser.add_argument("--status", choices=[s.value for s in Payout.Status],
                            help="the payout's status in the event (default: the type's)")
        parser.add_argument("--created", type=int,
                            help="the event's Stripe `created`, Unix seconds (default: now); "
                            "two events with the same one show the same-second rule")
        parser.add_argument("--original-payout", metavar="PO",
                            help="make the payout a reversal of this po_… (negative amount)")
        parser.add_argument("--reversed-by", metavar="PO",
                            help="the reversal's po_…, as Stripe sets it on the original")
        parser.add_argument("--failure-code", default="account_closed",
                            help="for payout.failed (any string: the set is open)")
        parser.add_argument("--url", default="http://127.0.0.1:8000/webhooks/stripe/")
        parser.add_argument("--secret", help="endpoint secret (default: STRIPE_WEBHOOK_SECRET, "
                            "else the development secret)")

    def handle(self, *args: Any, **options: Any) -> None:
        event = self._event(options)
        body = stripe_events.encode(event)
        secret = (options["secret"] or next(iter(settings.STRIPE_WEBHOOK_SECRETS), None)
                  or settings.DEV_WEBHOOK_SECRET)
        request = urllib.request.Request(options["url"], data=body, method="POST", headers={
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": stripe_events.sign(body, secret),
        })
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, answer = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, answer = exc.code, exc.read().decode()
        except urllib.error.URLError as exc:
            raise CommandError(f"cannot reach {options['url']}: {exc.reason}. "
                               "Is the console running (make run)?") from exc
        self.stdout.write(f"{event['type']} {event['id']} for {event['data']['object']['id']}"
                          f" → HTTP {status} {answer}")
        if status >= 400:
            raise CommandError(f"the endpoint refused the event (HTTP {status})")

    def _event(self, options: dict[str, Any]) -> dict[str, Any]:
        event_type = options["type"]
        payout_id = options["payout"] or stripe_events.new_id("po")
        fields: dict[str, Any] = {
            "status": options["status"] or stripe_events.TYPICAL_STATUS[event_type]}
        account = options["account"]
        known = (Payout.objects.select_related("seller", "original_payout")
                 .filter(stripe_payout_id=payout_id).first())
        original = options["original_payout"] or (
            known.original_payout.stripe_payout_id if known and known.original_payout else None)
        if original:
            fields["original_payout"] = original
        sign, lender = 1, known
        if known is None and original:  # a new reversal: it takes the original's money back
            sign = -1
            lender = Payout.objects.select_related("seller").filter(
                stripe_payout_id=original).first()
        if lender is not None:
            fields.update(amount=sign * lender.amount, currency=lender.currency)
            if lender is known:
                fields["metadata"] = known.metadata
            if lender.seller and not account:
                account = lender.seller.stripe_account_id
        for name in ("amount", "currency", "reversed_by"):
            if options[name] is not None:
                fields[name] = options[name]
        if fields["status"] == "failed":
            fields.update(stripe_events.failed_payout_defaults(),
                          failure_code=options["failure_code"])
        now = options["created"] or int(time.time())
        payout = stripe_events.payout_object(payout_id, created=now, **fields)
        return stripe_events.payout_event(event_type, payout, account=account, created=now)
