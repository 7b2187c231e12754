"""Paying sellers: transfers and a payout at Stripe, created exactly once.

Money leaves the platform here, so the work is split where a crash can happen:

1. Reserve (one SERIALIZABLE transaction, retried whole): lock the seller's
   released, unpaid transactions, create our Payout (our ``reference``, no
   Stripe id yet), its transfers and items, mark the transactions paid out.
   Two runs at once cannot take the same transaction: the second one's locks
   wait, then its transaction is retried and finds nothing left.
2. Submit (no database transaction open): create each transfer, then the
   payout on the seller's account, at Stripe, each with an idempotency key
   made of our ids. A crash or timeout here leaves the payout ``reserved``;
   running again sends the same keys, so Stripe answers with the objects it
   already made instead of making new ones.
3. Record the Stripe ids in one transaction.

Stripe keeps an idempotency key, and replays its first answer (a ``500`` too), for
at least 24 hours, then may forget it: the same key sent later can make a second
transfer or payout. So the time of the first request is recorded, and a resume
more than 23 hours after it first looks up what Stripe made (transfers by
``transfer_group``, payouts on the account carrying our reference), records it,
and only sends what is missing. A seller with a payout still reserved gets no new
one until it is finished.

A final Stripe error (the account cannot be paid, ...) reverses the transfers
already made and releases the transactions, so nothing is left half done; unless
Stripe's payout exists after all (we know its id or a webhook moved it): then
nothing is released, and the payout is marked for a person to review.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import stripe
import structlog
from django.db.models import Count, QuerySet, Sum
from django.utils import timezone

import txutils
from payouts.models import PaymentTransaction, PaymentTransfer, Payout, PayoutItem, Seller
from payouts.services import ledger
from payouts.services.ledger import METADATA_KEY
from payouts.stripe_api import stripe_client

log = structlog.get_logger(__name__)

Creation = Payout.Creation
# Stripe keeps an idempotency key at least 24 h; past this we no longer count on it.
KEYS_TRUSTED_FOR = timedelta(hours=23)
TRANSFER_KEY = "payout_console_transfer"  # our transfer's id, in its Stripe metadata


class PayoutStillPending(Exception):
    """Stripe could not be reached or answered with a temporary error: run again."""


class PayoutStillReserved(Exception):
    """The seller has a payout still reserved: it is finished before another is made."""


def idempotency_key(payout: Payout, what: str) -> str:
    return f"{payout.reference}:{what}"


# --- reads ---------------------------------------------------------------------------------


def eligible_transactions(seller: Seller, as_of: date) -> QuerySet[PaymentTransaction]:
    return PaymentTransaction.objects.filter(seller=seller, payed_out=False,
                                             release_date__lte=as_of)


@dataclass(frozen=True)
class Balance:
    seller: Seller
    currency: str
    amount: int
    transactions: int


def eligible_balances(as_of: date | None = None, seller: Seller | None = None) -> list[Balance]:
    """What each seller would be paid now, per currency (one aggregate query)."""
    as_of = as_of or timezone.localdate()
    rows = PaymentTransaction.objects.filter(payed_out=False, release_date__lte=as_of)
    if seller is not None:
        rows = rows.filter(seller=seller)
    totals = (rows.order_by().values("seller", "currency")
              .annotate(amount=Sum("amount"), n=Count("id")).order_by("seller", "currency"))
    sellers = Seller.objects.in_bulk({row["seller"] for row in totals})
    return [Balance(sellers[row["seller"]], row["currency"], row["amount"], row["n"])
            for row in totals]


def resumable_payouts(seller: Seller | None = None) -> QuerySet[Payout]:
    payouts = Payout.objects.filter(creation_state=Creation.RESERVED).select_related("seller")
    return payouts.filter(seller=seller) if seller is not None else payouts


# --- phase 1 -------------------------------------------------------------------------------


@txutils.financial_transaction(operation="payout.reserve")
def payout_reserve(*, seller: Seller, as_of: date) -> list[Payout]:
    """Phase 1: our payouts (one per currency) for the seller's released, unpaid money."""
    txutils.annotate(seller=seller.stripe_account_id)
    # Its money may already be at Stripe (a webhook that failed it released the
    # transactions before we recorded its transfers): finish that one first.
    open_payout = resumable_payouts(seller).order_by("created_at").first()
    if open_payout is not None:
        raise PayoutStillReserved(f"{seller.stripe_account_id} has payout "
                                  f"{open_payout.reference} still reserved: resume it first")
    locked = list(eligible_transactions(seller, as_of).select_for_update().order_by("id"))
    by_currency: dict[str, list[PaymentTransaction]] = defaultdict(list)
    for txn in locked:
        by_currency[txn.currency].append(txn)
    # Money of a payout that failed at the bank went back to the seller's Stripe balance,
    # not to us: its transfer stands, and paying it again needs only a new payout.
    standing = {t.payment_transaction_id: t for t in PaymentTransfer.objects.filter(
        payment_transaction__in=locked, stripe_transfer_id__isnull=False,
    ).exclude(status=PaymentTransfer.Status.REVERSED).order_by("id")}
    now = timezone.now()
    payouts = []
    for currency, txns in sorted(by_currency.items()):
        reference = f"pcp_{secrets.token_hex(12)}"
        payout = Payout.objects.create(
            seller=seller, reference=reference, creation_state=Creation.RESERVED,
            amount=sum(t.amount for t in txns), currency=currency,
            status=Payout.Status.PENDING, metadata={METADATA_KEY: reference})
        reused = [standing[t.id] for t in txns if t.id in standing]
        PaymentTransfer.objects.filter(id__in=[t.id for t in reused]).update(
            status=PaymentTransfer.Status.PENDING)
        transfers = reused + PaymentTransfer.objects.bulk_create(
            [PaymentTransfer(payment_transaction=t, amount=t.amount)
             for t in txns if t.id not in standing])
        PayoutItem.objects.bulk_create(
            [PayoutItem(payout=payout, payment_transfer=tr) for tr in transfers])
        PaymentTransaction.objects.filter(id__in=[t.id for t in txns]).update(
            payed_out=True, actual_release_date=now)
        payouts.append(payout)
        log.info("payout.reserved", reference=reference, seller=seller.stripe_account_id,
                 amount=payout.amount, currency=currency, transactions=len(txns))
    return payouts


# --- phases 2 and 3 ---------------------------------------------------------------------------


def payout_submit(*, payout: Payout, client: stripe.StripeClient | None = None) -> Payout:
    """Phases 2-3 for a reserved payout; safe to run again after any crash.

    Raises ``PayoutStillPending`` when Stripe could not be reached (the payout
    stays reserved); a final Stripe error fails the payout and releases it.
    """
    payout.refresh_from_db()  # a webhook may have linked it meanwhile
    if payout.creation_state != Creation.RESERVED:
        return payout
    client = client or stripe_client()
    assert payout.seller is not None, "only seller payouts are created here"
    account = payout.seller.stripe_account_id
    transfers = list(PaymentTransfer.objects.filter(payout_items__payout=payout).order_by("id"))
    # our transfer id -> tr_…: those standing from before, then those Stripe confirms now
    made = {t.pk: t.stripe_transfer_id for t in transfers if t.stripe_transfer_id}
    submitted_at = _submission_start(payout)
    if timezone.now() - submitted_at > KEYS_TRUSTED_FOR:
        found = _look_up(payout, account, made, submitted_at, client)
        if found is not None:  # Stripe made it: send nothing
            missing = [t.pk for t in transfers if t.pk not in made]
            if missing:
                _hold_for_review(payout, f"Stripe has its payout {found.id}, but no transfer "
                                         f"for our transfer(s) {missing}")
            return _payout_record(payout, made, found)
    stripe_payout: Any = None
    try:
        for transfer in transfers:
            if transfer.pk in made:
                continue
            created = client.v1.transfers.create(
                params={"amount": transfer.amount, "currency": payout.currency,
                        "destination": account, "transfer_group": payout.reference or "",
                        "metadata": {METADATA_KEY: payout.reference or "",
                                     TRANSFER_KEY: str(transfer.pk)}},
                options={"idempotency_key": idempotency_key(payout, f"transfer:{transfer.pk}")},
            )
            made[transfer.pk] = created.id
        if payout.stripe_payout_id is None:  # else its webhook proved Stripe made it
            stripe_payout = client.v1.payouts.create(
                params={"amount": payout.amount, "currency": payout.currency,
                        "metadata": {METADATA_KEY: payout.reference or ""}},
                options={"idempotency_key": idempotency_key(payout, "payout"),
                         "stripe_account": account},
            )
    except stripe.StripeError as exc:
        if _is_final(exc):
            return _payout_fail(payout, made, exc, client)
        log.warning("payout.submit_postponed", reference=payout.reference, error=str(exc))
        raise PayoutStillPending(f"{payout.reference}: {exc.user_message or exc}") from exc
    return _payout_record(payout, made, stripe_payout)


def _submission_start(payout: Payout) -> datetime:
    """When our first request for the payout went to Stripe: now, if none went yet. It
    is on record before the first request leaves, so a crash cannot lose it."""
    if payout.submitted_at is None:
        Payout.objects.filter(pk=payout.pk, submitted_at__isnull=True).update(
            submitted_at=timezone.now())
        payout.refresh_from_db(fields=["submitted_at"])
    assert payout.submitted_at is not None
    return payout.submitted_at


def _look_up(payout: Payout, account: str, made: dict[int, str], submitted_at: datetime,
             client: stripe.StripeClient) -> Any:
    """Past KEYS_TRUSTED_FOR, our keys may be forgotten: find what Stripe made for the
    payout before sending anything, and record the transfers. Returns Stripe's payout,
    if made. Anything unexpected stops the payout for a person to review."""
    reference = payout.reference or ""
    try:
        transfers = [t.to_dict() for t in client.v1.transfers.list(
            params={"transfer_group": reference, "limit": 100}).auto_paging_iter()]
        since = int((submitted_at - timedelta(hours=1)).timestamp())  # clocks may differ
        carrying = [p for p in client.v1.payouts.list(
            params={"created": {"gte": since}, "limit": 100},
            options={"stripe_account": account}).auto_paging_iter()
            if p.to_dict().get("metadata", {}).get(METADATA_KEY) == reference]
    except stripe.StripeError as exc:  # never final: not knowing is not a refusal
        raise PayoutStillPending(f"{reference}: looking up what Stripe made: {exc}") from exc
    found: dict[int, str] = {}
    for transfer in transfers:
        ours = str(transfer.get("metadata", {}).get(TRANSFER_KEY, ""))
        if transfer.get("amount_reversed"):
            _hold_for_review(payout, f"Stripe has reversed transfer {transfer['id']} of it (in "
                                     "part or whole): a release was under way")
        if ours.isdigit() and int(ours) in found:
            _hold_for_review(payout, f"Stripe has two transfers for our transfer {ours}: "
                                     f"{found[int(ours)]} and {transfer['id']}")
        if ours.isdigit():
            found[int(ours)] = transfer["id"]
    if len(carrying) > 1:
        _hold_for_review(payout, "Stripe has several payouts carrying its reference: "
                                 + ", ".join(p.id for p in carrying))
    new = {pk: tr for pk, tr in found.items() if made.get(pk) != tr}
    made.update(found)
    _transfers_record(new)
    log.info("payout.looked_up", reference=reference, transfers_found=len(found),
             payout_found=carrying[0].id if carrying else None)
    return carrying[0] if carrying else None


def _hold_for_review(payout: Payout, reason: str) -> None:
    ledger.flag_for_review(payout.pk, reason)
    raise PayoutStillPending(f"{payout.reference}: {reason}")


@txutils.financial_transaction(operation="payout.record_transfers")
def _transfers_record(made: dict[int, str]) -> None:
    for transfer_id, stripe_transfer_id in made.items():
        PaymentTransfer.objects.filter(pk=transfer_id, stripe_transfer_id__isnull=True).update(
            stripe_transfer_id=stripe_transfer_id)


def _is_final(exc: stripe.StripeError) -> bool:
    """4xx answers are Stripe's word on the request; 409 (a concurrent request with the
    same key), 429 and anything without an answer are worth another try."""
    status = exc.http_status
    return status is not None and 400 <= status < 500 and status not in (409, 429)


@txutils.financial_transaction(operation="payout.record_submission")
def _payout_record(payout: Payout, made: dict[int, str], stripe_payout: Any) -> Payout:
    """Phase 3: record Stripe's ids. ``stripe_payout`` is Stripe's answer, or None when a
    webhook linked the payout already. A webhook may also have moved it: its status stays.
    Stripe's status is taken only while no money has moved or come back (pending, in
    transit); a later one must come through its event, which moves the money with it."""
    locked = Payout.objects.select_for_update().get(pk=payout.pk)
    txutils.annotate(payout_id=locked.pk)
    if locked.creation_state != Creation.RESERVED:  # another run settled it meanwhile
        return locked
    _transfers_record(made)
    if stripe_payout is not None:
        if locked.stripe_payout_id is None:
            locked.stripe_payout_id = stripe_payout.id
        elif locked.stripe_payout_id != stripe_payout.id:
            ledger.review_request(locked.pk, f"Stripe answered {stripe_payout.id} for it, but "
                                             f"a webhook linked {locked.stripe_payout_id}")
        if not locked.last_event_id:  # no webhook applied yet: Stripe's answer is the news
            if stripe_payout.status in (Payout.Status.PENDING, Payout.Status.IN_TRANSIT):
                locked.status = stripe_payout.status
            else:
                ledger.review_request(locked.pk, f"Stripe reports it {stripe_payout.status}, "
                                                 "but no event of it was applied yet")
            arrival = getattr(stripe_payout, "arrival_date", None)
            if isinstance(arrival, int):
                locked.arrival_date = datetime.fromtimestamp(arrival, tz=UTC)
    locked.creation_state = Creation.SUBMITTED
    locked.creation_error = ""
    # Only these fields: a review asked for above is written to the row already.
    locked.save(update_fields=["stripe_payout_id", "status", "arrival_date", "creation_state",
                               "creation_error", "updated_at"])
    log.info("payout.submitted", reference=locked.reference, stripe_payout=locked.stripe_payout_id)
    return locked


def _stripe_made_it(payout: Payout) -> str:
    """Why Stripe's payout exists after all (we know its id, or a webhook moved it); ""
    when nothing says so."""
    if payout.stripe_payout_id:
        return f"Stripe's payout {payout.stripe_payout_id} exists"
    if payout.last_event_id:
        return f"event {payout.last_event_id} was applied to it"
    return ""


def _payout_fail(payout: Payout, made: dict[int, str], error: stripe.StripeError,
                 client: stripe.StripeClient) -> Payout:
    """A final Stripe error: undo the transfers Stripe made, then release the money;
    unless Stripe's payout exists after all."""
    payout.refresh_from_db()
    if _stripe_made_it(payout):
        return _release_refused(payout, error)
    try:
        for transfer_id, stripe_transfer_id in made.items():
            client.v1.transfers.reversals.create(
                stripe_transfer_id,
                options={"idempotency_key": idempotency_key(payout, f"reversal:{transfer_id}")})
    except stripe.StripeError as exc:  # Stripe keeps the first error per key: a rerun ends here
        raise PayoutStillPending(f"{payout.reference}: reversing its transfers: {exc}") from exc
    released = _payout_release(payout, made, f"{type(error).__name__}: "
                                             f"{error.user_message or error}")
    if released.creation_state == Creation.RESERVED:  # a webhook linked it meanwhile
        return _release_refused(released, error, note=f" (its transfers {sorted(made.values())} "
                                                       "were reversed at Stripe)")
    return released


def _release_refused(payout: Payout, error: stripe.StripeError, note: str = "") -> Payout:
    reason = (f"Stripe refused a request for it ({type(error).__name__}: "
              f"{error.user_message or error}), but {_stripe_made_it(payout)}: its money was "
              f"not released{note}; check it against Stripe")
    ledger.flag_for_review(payout.pk, reason)
    log.error("payout.release_refused", reference=payout.reference, reason=reason)
    raise PayoutStillPending(f"{payout.reference}: {reason}")


@txutils.financial_transaction(operation="payout.release")
def _payout_release(payout: Payout, reversed_transfers: dict[int, str], error: str) -> Payout:
    locked = Payout.objects.select_for_update().get(pk=payout.pk)
    txutils.annotate(payout_id=locked.pk)
    if locked.creation_state != Creation.RESERVED:
        # Another run settled it meanwhile, and its money may be in a newer payout by
        # now: releasing it again would pay it twice.
        return locked
    if _stripe_made_it(locked):  # a webhook linked it since we looked: the caller flags it
        return locked
    for transfer_id, stripe_transfer_id in reversed_transfers.items():
        PaymentTransfer.objects.filter(pk=transfer_id).update(
            stripe_transfer_id=stripe_transfer_id, status=PaymentTransfer.Status.REVERSED)
    ledger.payout_release(locked.pk)
    locked.status = Payout.Status.FAILED
    locked.creation_state = Creation.FAILED
    locked.creation_error = error
    locked.failure_message = error
    locked.save(update_fields=["status", "creation_state", "creation_error", "failure_message",
                               "updated_at"])
    log.warning("payout.creation_failed", reference=locked.reference, error=error)
    return locked


# --- the whole run ------------------------------------------------------------------------


def create_seller_payout(*, seller: Seller, as_of: date | None = None,
                         client: stripe.StripeClient | None = None) -> list[Payout]:
    """Reserve the seller's eligible money and submit it to Stripe (phases 1-3)."""
    client = client or stripe_client()  # refuse before reserving anything
    reserved = payout_reserve(seller=seller, as_of=as_of or timezone.localdate())
    return [payout_submit(payout=payout, client=client) for payout in reserved]


def payout_resume(*, payout_id: int) -> Payout:
    """Finish a reserved payout (superusers, from the console; the command does it too)."""
    return payout_submit(payout=Payout.objects.select_related("seller").get(pk=payout_id))
