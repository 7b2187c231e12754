"""Post a realistic, signed payout event to a running console, like `stripe trigger`."""

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
        fields: dict[str, Any] = {"status": stripe_events.STATUS_OF_TYPE[event_type]}
        account = options["account"]
        known = Payout.objects.select_related("seller").filter(stripe_payout_id=payout_id).first()
        if known is not None:
            fields.update(amount=known.amount, currency=known.currency, metadata=known.metadata)
            if known.seller and not account:
                account = known.seller.stripe_account_id
        if event_type == "payout.failed":
            fields.update(stripe_events.failed_payout_defaults(),
                          failure_code=options["failure_code"])
        now = int(time.time())
        payout = stripe_events.payout_object(payout_id, created=now, **fields)
        return stripe_events.payout_event(event_type, payout, account=account, created=now)
