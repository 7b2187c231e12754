"""Which payout event may change a payout: the one place that decides (pure, no database).

Stripe delivers events at least once and in any order. Before anything moves, an
event must agree with our payout (``disagreements``). A payout keeps the
``created`` time of the newest event applied to it; an older event is skipped.
Statuses move pending → in_transit → paid | failed | canceled, and paid → failed
(Stripe may fail a payout it reported paid); failed and canceled are final.
Stripe's ``created`` has one-second resolution: within one second the transition
table decides between different statuses, and a second event with the same status
changes nothing and asks for a reconciliation. The rules are in docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from payouts.models import Payout

Status = Payout.Status
PENDING, IN_TRANSIT, PAID, FAILED, CANCELED = (Status.PENDING, Status.IN_TRANSIT, Status.PAID,
                                               Status.FAILED, Status.CANCELED)

ALLOWED: dict[str, frozenset[str]] = {
    PENDING: frozenset({IN_TRANSIT, PAID, FAILED, CANCELED}),  # a missed event may skip a step
    IN_TRANSIT: frozenset({PAID, FAILED, CANCELED}),
    PAID: frozenset({FAILED}),
    FAILED: frozenset(),
    CANCELED: frozenset(),
}
FINAL = frozenset({FAILED, CANCELED})

# Event types whose type names the resulting status; created/updated carry it in the object.
STATUS_OF_TYPE = {"payout.paid": PAID, "payout.failed": FAILED, "payout.canceled": CANCELED}
HANDLED_TYPES = frozenset({"payout.created", "payout.updated", *STATUS_OF_TYPE})


@dataclass(frozen=True)
class Decision:
    apply: bool
    reason: str  # why, in a few words; shown to staff
    review: bool = False  # the payout should be checked against Stripe


def target_status(event_type: str, object_status: str) -> str:
    return STATUS_OF_TYPE.get(event_type, object_status)


def decide(
    *,
    current_status: str,
    last_event_id: str,
    last_event_created: datetime | None,
    event_id: str,
    event_created: datetime,
    new_status: str,
) -> Decision:
    """Apply this event to a payout in ``current_status``, or skip it (and why)?"""
    if event_id == last_event_id:
        return Decision(False, "already applied")
    if last_event_created is not None and event_created < last_event_created:
        return Decision(False, f"older than the newest applied event {last_event_id}")
    if event_created == last_event_created and new_status == current_status:
        # Same second, same status: which of the two is newer cannot be told, so the one
        # applied stays and Stripe's state is checked later.
        return Decision(False, f"same second and status as the applied event {last_event_id}; "
                               "payout marked for review", review=True)
    if new_status == current_status:
        return Decision(True, "no status change")
    if current_status in FINAL:
        return Decision(False, f"payout is {current_status}, a final status")
    if new_status not in ALLOWED.get(current_status, frozenset()):
        return Decision(False, f"no transition {current_status} → {new_status}")
    return Decision(True, f"{current_status} → {new_status}")


@dataclass(frozen=True)
class Ours:
    """What our ledger says a payout event must carry."""

    account: str  # the seller's connected account; "" for a platform payout
    amount: int
    currency: str


def disagreements(ours: Ours, *, account: str, payout_object: dict[str, Any]) -> list[str]:
    """Each field where an event disagrees with our payout, with both values; empty when
    it agrees. ``account`` is the event's connected account ("" for the platform)."""
    found = []
    if account != ours.account:
        found.append(f"account is {account or 'the platform'} in the event, "
                     f"{ours.account or 'the platform'} on our payout")
    amount = payout_object.get("amount")
    if amount != ours.amount or isinstance(amount, bool):
        found.append(f"amount is {amount} in the event, {ours.amount} on our payout")
    currency = payout_object.get("currency")
    if not isinstance(currency, str) or currency.lower() != ours.currency.lower():
        found.append(f"currency is {currency} in the event, {ours.currency} on our payout")
    return found
