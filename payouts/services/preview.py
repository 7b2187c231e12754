"""What a replay would do, without doing it.

Each event runs through the real processor (``processing.replay_uncommitted``: the
same code a replay runs) inside a SERIALIZABLE transaction that is always rolled back;
the payouts it touches are read before and after, inside that transaction, and the
difference is the preview. Nothing is written: not the event's status, not an attempt,
not an audit entry, and not a ``TransactionLog`` row either, because the transaction is
opened here with Django's ``atomic`` rather than by txutils (whose records become rows).
Stripe is never asked: an event naming a payout we lack previews as waiting for it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog
from django.db import DatabaseError, connection, transaction
from django.db.models import Q

import txutils
from payouts.models import Payout, PayoutItem, WebhookEvent
from payouts.services import ledger, processing

log = structlog.get_logger(__name__)

PREVIEW_LIMIT = 100  # events per preview: each runs the processor
LOCK_NOT_AVAILABLE = "55P03"


@dataclass(frozen=True)
class PayoutChange:
    """How one payout would change."""

    payout_id: int
    stripe_payout_id: str
    status_from: str  # "" when the replay would create the payout
    status_to: str
    currency: str
    released_count: int  # transactions owed to the seller again
    released_amount: int  # minor units
    transfers_moved: tuple[tuple[str, str, int], ...]  # (from status, to status, how many)
    becomes_reversed: bool
    review_reason: str  # what it would be marked for review with, if anything new

    @property
    def created(self) -> bool:
        return not self.status_from


@dataclass(frozen=True)
class Preview:
    """What replaying one event would do: the processor's outcome and the payouts moved."""

    event_id: int
    stripe_event_id: str
    event_type: str
    status: str  # the event's status now
    kind: str  # applied, skipped, held, ignored, retry, failed; or busy, error
    reason: str
    status_after: str  # the event's status after such a replay
    changes: tuple[PayoutChange, ...] = ()

    @property
    def changes_anything(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class _PayoutState:
    stripe_payout_id: str
    status: str
    currency: str
    reversed: bool
    review_reason: str
    payed_out: dict[int, tuple[bool, int]]  # transaction id -> (paid out, amount)
    transfers: dict[int, str]  # transfer id -> status


def event_preview(event_ids: list[int]) -> list[Preview]:
    """Preview a replay of each event, in the order given (unknown ids are left out)."""
    if len(event_ids) > PREVIEW_LIMIT:
        raise ValueError(f"at most {PREVIEW_LIMIT} events can be previewed at once")
    if connection.in_atomic_block:
        # Its own transaction is what makes it SERIALIZABLE and lets it roll back alone.
        raise RuntimeError("event_preview opens its own transaction; call it outside one")
    known = set(WebhookEvent.objects.filter(pk__in=event_ids).values_list("pk", flat=True))
    return [_preview_one(pk) for pk in dict.fromkeys(event_ids) if pk in known]


def _preview_one(event_id: int) -> Preview:
    event = WebhookEvent.objects.only("stripe_event_id", "type", "status").get(pk=event_id)
    facts = {"event_id": event.pk, "stripe_event_id": event.stripe_event_id,
             "event_type": event.type, "status": event.status}
    with structlog.contextvars.bound_contextvars(preview=True):  # its logs say it was one
        try:
            return _rolled_back(event_id, facts)
        except DatabaseError as exc:
            code = txutils.sqlstate_of(exc)
            if code == LOCK_NOT_AVAILABLE or code in txutils.RETRYABLE_SQLSTATES:
                return Preview(**facts, kind="busy", status_after=event.status,
                               reason=f"the event or its payout is being processed right now "
                                      f"(SQLSTATE {code}); preview again in a moment")
            log.exception("preview.failed", event_pk=event_id)
            return Preview(**facts, kind="error", status_after=event.status,
                           reason=f"{type(exc).__name__}: {exc}")


def _rolled_back(event_id: int, facts: dict[str, Any]) -> Preview:
    with transaction.atomic():
        with connection.cursor() as cursor:  # the first statement, as PostgreSQL requires
            cursor.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        before_ids = _payouts_named(event_id)
        before = _states(before_ids)
        outcome = processing.replay_uncommitted(event_id)
        after_ids = set(before_ids)
        if outcome.payout_id is not None:
            after_ids |= _with_originals({outcome.payout_id})
        after = _states(after_ids)
        transaction.set_rollback(True)  # whatever happened, nothing of it stays
    changes = [c for pk in sorted(after_ids, key=lambda pk: pk != outcome.payout_id)
               if (c := _change(pk, before.get(pk), after.get(pk))) is not None]
    return Preview(**facts, kind=str(outcome.kind), reason=outcome.reason,
                   status_after=outcome.status_after, changes=tuple(changes))


def _payouts_named(event_id: int) -> set[int]:
    """The payouts the event could touch: its own (by Stripe id or our reference), the
    original it reverses, and the originals of those."""
    raw = WebhookEvent.objects.filter(pk=event_id).values_list("raw_body", flat=True).get()
    try:
        payout_object = json.loads(bytes(raw))["data"]["object"]
        stripe_ids = {str(payout_object["id"]),
                      ledger.stripe_id_of(payout_object.get("original_payout"))} - {""}
        reference = ledger.reference_of(payout_object)
    except (ValueError, KeyError, TypeError):
        return set()  # not a payout event: the processor ignores it
    named = Q(stripe_payout_id__in=stripe_ids)
    if reference:
        named |= Q(reference=reference)
    return _with_originals(set(Payout.objects.filter(named).values_list("pk", flat=True)))


def _with_originals(payout_ids: set[int]) -> set[int]:
    originals = Payout.objects.filter(pk__in=payout_ids, original_payout__isnull=False)
    return payout_ids | set(originals.values_list("original_payout_id", flat=True))


def _states(payout_ids: set[int]) -> dict[int, _PayoutState]:
    items: dict[int, list[dict[str, Any]]] = {}
    for item in PayoutItem.objects.filter(payout_id__in=payout_ids).values(
            "payout_id", "payment_transfer_id", "payment_transfer__status",
            "payment_transfer__payment_transaction_id",
            "payment_transfer__payment_transaction__payed_out",
            "payment_transfer__payment_transaction__amount"):
        items.setdefault(item["payout_id"], []).append(item)
    states = {}
    for payout in Payout.objects.filter(pk__in=payout_ids):
        mine = items.get(payout.pk, [])
        states[payout.pk] = _PayoutState(
            stripe_payout_id=payout.stripe_payout_id or payout.reference or str(payout.pk),
            status=payout.status, currency=payout.currency,
            reversed=payout.reversed_at is not None, review_reason=payout.review_reason,
            payed_out={i["payment_transfer__payment_transaction_id"]: (
                i["payment_transfer__payment_transaction__payed_out"],
                i["payment_transfer__payment_transaction__amount"]) for i in mine},
            transfers={i["payment_transfer_id"]: i["payment_transfer__status"] for i in mine})
    return states


def _change(payout_id: int, before: _PayoutState | None,
            after: _PayoutState | None) -> PayoutChange | None:
    """The difference, or None when the payout would not change."""
    if after is None:
        return None
    was = before or _PayoutState(after.stripe_payout_id, "", after.currency, False, "", {}, {})
    released = [amount for txn, (paid, amount) in after.payed_out.items()
                if not paid and was.payed_out.get(txn, (False, 0))[0]]
    moved = Counter((was.transfers[t], status) for t, status in after.transfers.items()
                    if t in was.transfers and was.transfers[t] != status)
    review = after.review_reason[len(was.review_reason):].strip() \
        if after.review_reason != was.review_reason else ""
    change = PayoutChange(
        payout_id=payout_id, stripe_payout_id=after.stripe_payout_id, status_from=was.status,
        status_to=after.status, currency=after.currency, released_count=len(released),
        released_amount=sum(released),
        transfers_moved=tuple(sorted((a, b, n) for (a, b), n in moved.items())),
        becomes_reversed=after.reversed and not was.reversed, review_reason=review)
    unchanged = (before is not None and was.status == after.status and not released
                 and not moved and not change.becomes_reversed and not review)
    return None if unchanged else change
