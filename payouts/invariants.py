"""The ledger's money invariants, checked over the whole database (``check_ledger``).

A payout is *live* while its money is on its way to, or at, the bank: pending, in
transit or paid, and not reversed. Failed and canceled payouts, and reversed ones,
gave the money back to the seller's Stripe balance. Then:

* every transaction of a failed, canceled or reversed payout is released, unless
  a live payout (a newer one) holds it;
* every transaction marked paid out is in exactly one live payout;
* every transaction in a live payout is marked paid out (else it can be paid twice);
* a transaction is paid out exactly when it has an actual release date;
* the items of a payout we created add up to its amount.

Reads only; safe to run against production at any time (a few full scans).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection

from payouts.models import PaymentTransaction, PaymentTransfer, Payout, PayoutItem

TXN = PaymentTransaction._meta.db_table
TRANSFER = PaymentTransfer._meta.db_table
ITEM = PayoutItem._meta.db_table
PAYOUT = Payout._meta.db_table

LIVE = ", ".join(f"'{status}'" for status in Payout.LIVE)

# Each transaction held by a payout: the live payouts holding it, and those that gave
# its money back.
HOLDERS_SQL = f"""
WITH holders AS (
    SELECT t.id, t.payed_out,
           p.status IN ({LIVE}) AND p.reversed_at IS NULL AS live,
           coalesce(p.stripe_payout_id, p.reference, p.id::text) || ' (' ||
               CASE WHEN p.reversed_at IS NULL THEN p.status ELSE 'reversed' END || ')' AS label
    FROM {TXN} t
    JOIN {TRANSFER} tr ON tr.payment_transaction_id = t.id
    JOIN {ITEM} i ON i.payment_transfer_id = tr.id
    JOIN {PAYOUT} p ON p.id = i.payout_id
)
SELECT id, bool_or(payed_out),
       array_agg(DISTINCT label ORDER BY label) FILTER (WHERE live),
       array_agg(DISTINCT label ORDER BY label) FILTER (WHERE NOT live)
FROM holders GROUP BY id ORDER BY id"""

# Paid out without any payout at all, or released/paid-out flags out of step.
LOOSE_SQL = f"""
SELECT t.id, t.payed_out, t.actual_release_date IS NOT NULL FROM {TXN} t
WHERE (t.payed_out <> (t.actual_release_date IS NOT NULL))
   OR (t.payed_out AND NOT EXISTS (
        SELECT 1 FROM {TRANSFER} tr JOIN {ITEM} i ON i.payment_transfer_id = tr.id
        WHERE tr.payment_transaction_id = t.id))
ORDER BY t.id"""

ITEMS_SQL = f"""
SELECT p.id, p.reference, coalesce(p.stripe_payout_id, ''), p.amount,
       coalesce(sum(tr.amount), 0), count(i.id)
FROM {PAYOUT} p
LEFT JOIN {ITEM} i ON i.payout_id = p.id
LEFT JOIN {TRANSFER} tr ON tr.id = i.payment_transfer_id
WHERE p.reference IS NOT NULL
GROUP BY p.id HAVING p.amount <> coalesce(sum(tr.amount), 0)
ORDER BY p.id"""


@dataclass(frozen=True)
class Violation:
    check: str  # which invariant
    message: str  # with the ids involved


def ledger_violations() -> list[Violation]:
    """Every violation of the money invariants, in a stable order; empty when the ledger
    holds."""
    found: list[Violation] = []
    with connection.cursor() as cursor:
        cursor.execute(HOLDERS_SQL)
        for txn, payed_out, live, returned in cursor.fetchall():
            live, returned = live or [], returned or []
            if payed_out and not live and returned:
                found.append(Violation(
                    "returned_released",
                    f"transaction {txn} is still paid out, but {', '.join(returned)} gave "
                    "its money back and no live payout holds it"))
            elif payed_out and len(live) != 1:
                found.append(Violation(
                    "paid_out_in_one_live_payout",
                    f"transaction {txn} is paid out in {len(live)} live payouts: "
                    f"{', '.join(live) or 'none'}"))
            elif not payed_out and live:
                found.append(Violation(
                    "live_payout_paid_out",
                    f"transaction {txn} is released (owed again) but live payout "
                    f"{', '.join(live)} holds it: it can be paid twice"))
        cursor.execute(LOOSE_SQL)
        for txn, payed_out, dated in cursor.fetchall():
            if payed_out != dated:
                found.append(Violation(
                    "release_date", f"transaction {txn} is "
                    f"{'paid out' if payed_out else 'released'} but "
                    f"{'has no' if payed_out else 'still has an'} actual release date"))
            else:
                found.append(Violation(
                    "paid_out_in_one_live_payout",
                    f"transaction {txn} is paid out but in no payout at all"))
        cursor.execute(ITEMS_SQL)
        for pk, reference, stripe_id, amount, items_total, items in cursor.fetchall():
            found.append(Violation(
                "items_add_up",
                f"payout {reference} ({stripe_id or 'no Stripe id'}, id {pk}) is for {amount} "
                f"but its {items} item(s) add up to {items_total}"))
    return found
