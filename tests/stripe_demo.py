"""``python -m tests.stripe_demo [--port 12111]``: a fake Stripe that knows more than the
demo's webhooks told it, to try ``sync_events`` and ``reconcile_payouts`` by hand.

It mirrors the checkout's ledger (every payout with a Stripe id, on its seller's
connected account, as we have it), then moves a few payouts at "Stripe" the way the
webhooks would have said if they had arrived:

* payouts in transit whose arrival date has passed are paid, with their
  ``payout.paid`` events (``sync_events`` recovers them);
* the newest payout in transit fails silently, its event past the Events API's
  30 days (only ``reconcile_payouts`` finds it).

Then it serves on 127.0.0.1 until Ctrl-C and prints the commands to run against it.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import UTC, datetime

from payouts import stripe_events
from tests.fakestripe import FakeStripe

API_KEY = "sk_test_payout_console_demo"


def mirror(fake: FakeStripe) -> list[str]:
    """Put our payouts at the fake, and change a few there; what it changed, in words."""
    from payouts.models import Payout  # Django is set up by now

    now = int(time.time())
    payouts = list(Payout.objects.filter(stripe_payout_id__isnull=False)
                   .select_related("seller").order_by("created_at"))
    for payout in payouts:
        arrival = int(payout.arrival_date.timestamp()) if payout.arrival_date else None
        fake.add_payout(stripe_events.payout_object(
            payout.stripe_payout_id or "", status=payout.status, amount=payout.amount,
            currency=payout.currency, created=int(payout.created_at.timestamp()),
            arrival_date=arrival, failure_code=payout.failure_code or None,
            metadata=payout.metadata), payout.seller.stripe_account_id if payout.seller else "",
            events=False)
    changed = []
    in_transit = [p for p in payouts if p.status == Payout.Status.IN_TRANSIT]
    for payout in in_transit[:-1]:
        if payout.arrival_date and payout.arrival_date.timestamp() < now:
            fake.set_status(payout.stripe_payout_id or "", "paid")
            changed.append(f"{payout.stripe_payout_id}: paid (payout.paid listed by the "
                           "Events API)")
    if in_transit:
        silent = in_transit[-1]
        fake.set_status(silent.stripe_payout_id or "", "failed", events=False,
                        failure_code="could_not_process",
                        failure_message="The bank could not process this payout.")
        changed.append(f"{silent.stripe_payout_id}: failed, with no event listed")
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=12111)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
    import django

    django.setup()
    fake = FakeStripe().start(args.port)
    try:
        changed = mirror(fake)
        print(f"A fake Stripe on {fake.url} ({len(fake.payouts)} payouts mirrored at "
            f"{datetime.now(UTC):%H:%M UTC}). At Stripe, unknown to the ledger:")
        for line in changed:
            print(f"  {line}")
        env = f"LOG_LEVEL=WARNING STRIPE_API_KEY={API_KEY} STRIPE_API_BASE={fake.url}"
        print("Try, in another terminal:")
        print(f"  {env} .venv/bin/python manage.py sync_events")
        print(f"  {env} .venv/bin/python manage.py reconcile_payouts")
        print(f"  {env} .venv/bin/python manage.py reconcile_payouts --apply")
        print(f"  {env} .venv/bin/python manage.py process_webhooks   # the schedule")
        print("Ctrl-C stops it.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
