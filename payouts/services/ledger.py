"""The ledger update: one payout event applied to the payout ledger, held, or skipped.

Runs inside the caller's SERIALIZABLE transaction (``update_payout_from_webhook``
opens one for a standalone call). Locks are taken in one order by every processor:
the event row (when it was stored first), the payout, the original of a reversal,
then a payout's items by id. The steps:

1. find the payout: by Stripe id, else ours by the reference in its metadata (and
   link it), else create it from ``payout.created``; any other event waits for it;
2. check the event against our payout (account, amount, currency): on any
   disagreement the event is held and nothing moves;
3. decide by age and the transition table (``payouts.transitions``);
4. apply: the payout's fields, its transfers, and for money Stripe gave back
   (failed, canceled) its transactions released, in one statement;
5. a reversal that became paid releases its original's transactions.

The rules are described in docs/design.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import structlog
from django.db import connection
from django.utils import timezone

import txutils
from payouts import transitions
from payouts.models import PaymentTransaction, PaymentTransfer, Payout, PayoutItem, Seller
from payouts.services.outcome import Outcome, ProcessingOutcome

log = structlog.get_logger(__name__)

METADATA_KEY = "payout_console_payout"  # our reference, in Stripe's metadata: never rename
Status = Payout.Status
Creation = Payout.Creation
Transfer = PaymentTransfer.Status


class EventFacts(Protocol):
    """What the ledger reads of an event, stored or still being stored."""

    @property
    def stripe_event_id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def account(self) -> str: ...  # "" for the platform
    @property
    def stripe_created(self) -> datetime: ...


class Move(NamedTuple):
    """How a payout's transfers (and transactions) move when it settles."""

    transfer_status: str
    transfer_from: tuple[str, ...]
    release: bool  # the money is back on the seller's balance: transactions owed again


# Paid: its transfers are paid. Money given back (failed, canceled, or a paid reversal):
# the transfers stand on the seller's Stripe balance, marked failed so that the next
# payout reuses them, and the transactions are released. A transfer reversed at Stripe
# (platform money back) never moves.
PAID_MOVE = Move(Transfer.PAID, (Transfer.PENDING,), release=False)
RETURNED_MOVE = Move(Transfer.FAILED, (Transfer.PENDING, Transfer.PAID), release=True)


def move_for(status: str) -> Move | None:
    if status == Status.PAID:
        return PAID_MOVE
    if status in Payout.RETURNED:
        return RETURNED_MOVE
    return None


PAYOUT = Payout._meta.db_table
SELLER = Seller._meta.db_table
ITEM = PayoutItem._meta.db_table
TRANSFER = PaymentTransfer._meta.db_table
TRANSACTION = PaymentTransaction._meta.db_table

# The payout with what the checks compare. It is found by its Stripe id, through the
# hash index (see the Payout model): by our id, or through a btree, SERIALIZABLE would
# read the index page where the updates of neighbouring payouts insert, and report
# conflicts between unrelated deliveries.
LOCK_SQL = f"""
SELECT p.id, p.stripe_payout_id, p.status, p.last_event_id, p.last_event_created, p.amount,
       p.currency, coalesce(s.stripe_account_id, ''), p.reversed_at IS NOT NULL,
       p.original_payout_id, p.creation_state
FROM {PAYOUT} p LEFT JOIN {SELLER} s ON s.id = p.seller_id
WHERE p.{{column}} = %s FOR UPDATE OF p{{nowait}}"""

# A payout's items locked by id (the same order for every processor), then its transfers
# moved and, when the money came back, its transactions released: one bulk UPDATE each.
ITEMS_AND_MOVES = f"""
items AS (
    SELECT payment_transfer_id FROM {ITEM}
    WHERE payout_id = %(payout)s AND %(settles)s
    ORDER BY id FOR UPDATE{{nowait}}
), transfers AS (
    UPDATE {TRANSFER} SET status = %(transfer_status)s
    WHERE id IN (SELECT payment_transfer_id FROM items) AND status = ANY(%(transfer_from)s)
), released AS (
    UPDATE {TRANSACTION} SET payed_out = false, actual_release_date = NULL
    WHERE %(release)s AND payed_out AND id IN (
        SELECT payment_transaction_id FROM {TRANSFER}
        WHERE id IN (SELECT payment_transfer_id FROM items))
    RETURNING 1
)
SELECT count(*) FROM released"""

# Everything an applied event changes, in one statement (one round trip).
APPLY_SQL = f"""
WITH payout AS (
    UPDATE {PAYOUT} SET
        status = %(status)s,
        arrival_date = COALESCE(%(arrival_date)s, arrival_date),
        metadata = COALESCE(%(metadata)s::jsonb, metadata),
        failure_code = CASE WHEN %(failed)s THEN %(failure_code)s ELSE failure_code END,
        failure_message = CASE WHEN %(failed)s THEN %(failure_message)s ELSE failure_message END,
        reversed_by = CASE WHEN %(reversed_by)s <> '' THEN %(reversed_by)s ELSE reversed_by END,
        last_event_id = %(event_id)s,
        last_event_type = %(event_type)s,
        last_event_created = %(event_created)s,
        events_applied = events_applied + 1,
        updated_at = now()
    WHERE stripe_payout_id = %(stripe_payout_id)s
), {ITEMS_AND_MOVES}"""

RELEASE_SQL = f"WITH {ITEMS_AND_MOVES}"

REVIEW_SQL = f"""
UPDATE {PAYOUT} SET
    review_reason = CASE WHEN review_reason = '' THEN %(reason)s
                         WHEN strpos(review_reason, %(reason)s) > 0 THEN review_reason
                         ELSE review_reason || E'\\n' || %(reason)s END,
    review_requested_at = COALESCE(review_requested_at, now()),
    updated_at = now()
WHERE id = %(payout)s"""


@dataclass(frozen=True)
class Locked:
    """Our payout, locked for this transaction."""

    id: int
    stripe_payout_id: str | None
    status: str
    last_event_id: str
    last_event_created: datetime | None
    ours: transitions.Ours
    reversed: bool
    original_id: int | None
    creation_state: str

    @property
    def live(self) -> bool:
        return self.status in Payout.LIVE and not self.reversed


def _nowait(nowait: bool) -> str:
    return " NOWAIT" if nowait else ""


def _lock(column: str, value: Any, *, nowait: bool) -> Locked | None:
    with connection.cursor() as cursor:
        cursor.execute(LOCK_SQL.format(column=column, nowait=_nowait(nowait)), [value])
        row = cursor.fetchone()
    if row is None:
        return None
    (pk, stripe_id, status, last_id, last_created, amount, currency, account, reversed_,
     original_id, creation_state) = row
    return Locked(pk, stripe_id, status, last_id, last_created,
                  transitions.Ours(account, amount, currency), reversed_, original_id,
                  creation_state)


def _from_unix(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if isinstance(value, int) else None


def stripe_id_of(value: Any) -> str:
    """An expandable Stripe field: the id as a string, or the object carrying it."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else ""


def reference_of(payout_object: dict[str, Any]) -> str:
    metadata = payout_object.get("metadata")
    reference = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    return reference if isinstance(reference, str) else ""


# --- the update ----------------------------------------------------------------------------


@txutils.financial_transaction(operation="payout.apply_event")
def update_payout_from_webhook(
    event: EventFacts, payout_object: dict[str, Any], *, nowait: bool = False
) -> ProcessingOutcome:
    """Apply one payout event to its payout, in one SERIALIZABLE transaction retried
    whole on 40001/40P01. Applying the same event again changes nothing. ``nowait``
    makes a locked payout an error (55P03) instead of a wait, for callers that must
    answer quickly. (The processor runs ``apply_event`` inside its own transaction.)
    """
    return apply_event(event, payout_object, nowait=nowait)


def apply_event(event: EventFacts, payout_object: dict[str, Any], *,
                nowait: bool) -> ProcessingOutcome:
    """Steps 1-5 of the module's docstring; the caller holds the SERIALIZABLE transaction."""
    stripe_payout_id = payout_object["id"]
    payout = _lock("stripe_payout_id", stripe_payout_id, nowait=nowait)
    if payout is None:
        # A reversal is never one of ours, whatever its metadata says.
        reference = "" if payout_object.get("original_payout") else reference_of(payout_object)
        payout = _lock("reference", reference, nowait=nowait) if reference else None
        if payout is None:
            return _payout_create(event, payout_object, nowait=nowait)
        if payout.stripe_payout_id is not None or payout.creation_state == Creation.FAILED:
            # Stripe made a payout we have another one for, or one we gave up making and
            # whose money we released: either way it may be paid twice.
            made = (f"which is Stripe's {payout.stripe_payout_id}"
                    if payout.stripe_payout_id else "whose creation failed and whose money "
                    "was released")
            problem = (f"its metadata names our payout {reference}, {made}: Stripe made "
                       f"{stripe_payout_id} for it too")
            review_request(payout.id, f"{event.stripe_event_id}: {problem}")
            return _held(payout.id, stripe_payout_id, [problem])
    txutils.annotate(payout_id=payout.id)

    problems = transitions.disagreements(payout.ours, account=event.account,
                                         payout_object=payout_object)
    if problems:
        return _held(payout.id, stripe_payout_id, problems)
    if payout.stripe_payout_id is None:
        _link(payout, stripe_payout_id)

    new_status = transitions.target_status(event.type, str(payout_object.get("status", "")))
    decision = transitions.decide(
        current_status=payout.status, last_event_id=payout.last_event_id,
        last_event_created=payout.last_event_created, event_id=event.stripe_event_id,
        event_created=event.stripe_created, new_status=new_status,
    )
    if not decision.apply:
        if decision.review:
            review_request(payout.id, f"{event.stripe_event_id} came in the same second as "
                                      f"{payout.last_event_id}, with the same status: which "
                                      "is Stripe's newest cannot be told")
        return ProcessingOutcome(Outcome.SKIPPED, decision.reason, payout.id)

    settled = new_status != payout.status
    move = move_for(new_status) if settled and not payout.reversed else None
    metadata = payout_object.get("metadata")
    failed = new_status in Payout.RETURNED
    with connection.cursor() as cursor:
        cursor.execute(APPLY_SQL.format(nowait=_nowait(nowait)), {
            "payout": payout.id, "stripe_payout_id": stripe_payout_id, "status": new_status,
            "arrival_date": _from_unix(payout_object.get("arrival_date")),
            "metadata": json.dumps(metadata) if isinstance(metadata, dict) else None,
            "failed": failed,
            # an open set of codes: any string is kept
            "failure_code": str(payout_object.get("failure_code") or "")[:64],
            "failure_message": str(payout_object.get("failure_message") or ""),
            "reversed_by": stripe_id_of(payout_object.get("reversed_by"))[:64],
            "event_id": event.stripe_event_id, "event_type": event.type,
            "event_created": event.stripe_created, **_move_params(move),
        })
        released = cursor.fetchone()[0]
    if move is not None and move.release:
        log.info("payout.transactions_released", payout=stripe_payout_id, count=released)
    log.info("payout.transitioned", payout=stripe_payout_id, stripe_event=event.stripe_event_id,
             from_status=payout.status, to_status=new_status)
    if payout.original_id is not None and settled:
        _reversal_moved(payout.original_id, stripe_payout_id, payout.status, new_status,
                        nowait=nowait)
    return ProcessingOutcome(Outcome.APPLIED, decision.reason, payout.id)


def _move_params(move: Move | None) -> dict[str, Any]:
    if move is None:
        return {"settles": False, "transfer_status": "", "transfer_from": [], "release": False}
    return {"settles": True, "transfer_status": move.transfer_status,
            "transfer_from": list(move.transfer_from), "release": move.release}


def _held(payout_id: int | None, stripe_payout_id: str, problems: list[str]) -> ProcessingOutcome:
    reason = "disagrees with our ledger: " + "; ".join(problems)
    log.warning("payout.event_held", payout=stripe_payout_id, reason=reason)
    return ProcessingOutcome(Outcome.HELD, reason, payout_id)


def _link(payout: Locked, stripe_payout_id: str) -> None:
    """A payout we created whose Stripe id we have not recorded yet (the webhook beat our
    phase 3), found by our reference and checked like any other: record Stripe's id."""
    Payout.objects.filter(pk=payout.id).update(stripe_payout_id=stripe_payout_id,
                                               updated_at=timezone.now())
    log.info("payout.linked", payout=stripe_payout_id, payout_pk=payout.id)


def _payout_create(event: EventFacts, payout_object: dict[str, Any], *,
                   nowait: bool) -> ProcessingOutcome:
    """An unknown payout: created from ``payout.created``; any other event waits for it,
    because a webhook can beat the commit of a payout we are creating ourselves."""
    stripe_payout_id = payout_object["id"]
    if event.type != "payout.created":
        return ProcessingOutcome(Outcome.RETRY, f"payout {stripe_payout_id} is not known yet",
                                 missing_payout=stripe_payout_id)
    seller = None
    if event.account:
        seller = Seller.objects.filter(stripe_account_id=event.account).first()
        if seller is None:
            return ProcessingOutcome(Outcome.RETRY, f"seller {event.account} is not known yet")
    original = None
    original_stripe_id = stripe_id_of(payout_object.get("original_payout"))
    if original_stripe_id:
        original = _lock("stripe_payout_id", original_stripe_id, nowait=nowait)
        if original is None:
            return ProcessingOutcome(Outcome.RETRY, f"payout {original_stripe_id}, which "
                                     f"{stripe_payout_id} reverses, is not known yet",
                                     missing_payout=original_stripe_id)
        # A reversal takes back exactly the original's money, on the same account.
        problems = transitions.disagreements(
            transitions.Ours(original.ours.account, -original.ours.amount,
                             original.ours.currency),
            account=event.account, payout_object=payout_object)
        if problems:
            return _held(None, stripe_payout_id,
                         [f"as the reversal of {original_stripe_id}: {p}" for p in problems])
    status = str(payout_object.get("status") or Status.PENDING)
    payout = Payout.objects.create(
        seller=seller,
        stripe_payout_id=stripe_payout_id,
        amount=int(payout_object.get("amount") or 0),
        currency=str(payout_object.get("currency") or "")[:3],
        status=status,
        arrival_date=_from_unix(payout_object.get("arrival_date")),
        failure_code=str(payout_object.get("failure_code") or "")[:64],
        failure_message=str(payout_object.get("failure_message") or ""),
        metadata=payout_object.get("metadata") or {},
        original_payout_id=original.id if original else None,
        reversed_by=stripe_id_of(payout_object.get("reversed_by"))[:64],
        last_event_id=event.stripe_event_id,
        last_event_type=event.type,
        last_event_created=event.stripe_created,
        events_applied=1,
    )
    txutils.annotate(payout_id=payout.pk)
    log.info("payout.created", payout=stripe_payout_id, stripe_event=event.stripe_event_id)
    if original is not None:
        Payout.objects.filter(pk=original.id, reversed_by="").update(reversed_by=stripe_payout_id)
        _reversal_moved(original.id, stripe_payout_id, "", status, nowait=nowait)
    return ProcessingOutcome(Outcome.APPLIED, "created", payout.pk)


# --- money given back ---------------------------------------------------------------------


def _reversal_moved(original_id: int, reversal: str, previous: str, status: str, *,
                    nowait: bool) -> None:
    """A reversal changed status. Paid: its original's money is back on the seller's
    balance, so the original's transactions are released (once: only while the original
    is live). Failed or canceled before it was paid: nothing happened to the original."""
    if status != Status.PAID and previous != Status.PAID:
        return
    original = _lock("id", original_id, nowait=nowait)
    assert original is not None, "a reversal's original is protected from deletion"
    if status != Status.PAID:
        review_request(original.id, f"its reversal {reversal} became {status} after it was "
                                    "paid; the transactions were released when it was paid")
        return
    if not original.live:
        state = "reversed" if original.reversed else original.status
        review_request(original.id, f"its reversal {reversal} was paid while the payout was "
                                    f"already {state}; nothing was released again")
        return
    released = payout_release(original.id, nowait=nowait)
    Payout.objects.filter(pk=original.id).update(reversed_at=timezone.now(),
                                                 reversed_by=reversal, updated_at=timezone.now())
    log.info("payout.reversed", payout=original.stripe_payout_id, reversal=reversal,
             transactions_released=released)


def payout_release(payout_id: int, *, nowait: bool = False) -> int:
    """Stripe gave the payout's money back: its transfers stand on the seller's balance
    (failed, reused by the next payout) and its transactions are owed again. Inside the
    caller's transaction, with the payout locked. Returns the transactions released."""
    with connection.cursor() as cursor:
        cursor.execute(RELEASE_SQL.format(nowait=_nowait(nowait)),
                       {"payout": payout_id, **_move_params(RETURNED_MOVE)})
        return int(cursor.fetchone()[0])


def review_request(payout_id: int, reason: str) -> None:
    """Mark the payout for a person (and reconciliation against Stripe), saying why."""
    with connection.cursor() as cursor:
        cursor.execute(REVIEW_SQL, {"payout": payout_id, "reason": reason})
    log.warning("payout.review_requested", payout_pk=payout_id, reason=reason)


@txutils.financial_transaction(operation="payout.review_requested")
def flag_for_review(payout_id: int, reason: str) -> None:
    """``review_request`` in a transaction of its own."""
    review_request(payout_id, reason)
