"""Ledger rows for tests, shaped as `create_payouts` leaves them."""

from __future__ import annotations

import itertools
from datetime import date

from django.utils import timezone

from payouts.models import PaymentTransaction, PaymentTransfer, Payout, PayoutItem, Seller

_serial = itertools.count(1)


def make_seller(account: str | None = None, name: str = "Test Seller") -> Seller:
    n = next(_serial)
    return Seller.objects.create(name=f"{name} {n}",
                                 stripe_account_id=account or f"acct_test{n:08d}")


def make_payout(
    seller: Seller | None = None,
    *,
    stripe_payout_id: str | None = None,
    status: str = "in_transit",
    transactions: int = 3,
    amount_each: int = 1000,
) -> Payout:
    """A payout with ``transactions`` paid-out transactions, each with a pending transfer."""
    seller = seller or make_seller()
    n = next(_serial)
    released_at = timezone.now()
    payout = Payout.objects.create(
        seller=seller, stripe_payout_id=stripe_payout_id or f"po_test{n:010d}",
        amount=amount_each * transactions, currency="usd", status=status)
    for k in range(transactions):
        txn = PaymentTransaction.objects.create(
            seller=seller, amount=amount_each, currency="usd", release_date=date.today(),
            payed_out=True, actual_release_date=released_at)
        transfer = PaymentTransfer.objects.create(
            payment_transaction=txn, amount=amount_each, stripe_transfer_id=f"tr_test{n}x{k}")
        PayoutItem.objects.create(payout=payout, payment_transfer=transfer)
    return payout
