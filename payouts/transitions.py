"""Which payout event may change a payout: the one place that decides (pure, no database).

Stripe delivers events at least once and in any order. A payout keeps the
``created`` time of the newest event applied to it; an older event is skipped.
Statuses move pending → in_transit → paid | failed | canceled, and paid → failed
(Stripe may fail a payout it reported paid); failed and canceled are final.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

PENDING, IN_TRANSIT, PAID, FAILED, CANCELED = "pending", "in_transit", "paid", "failed", "canceled"

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
    if new_status == current_status:
        return Decision(True, "no status change")
    if current_status in FINAL:
        return Decision(False, f"payout is {current_status}, a final status")
    if new_status not in ALLOWED.get(current_status, frozenset()):
        return Decision(False, f"no transition {current_status} → {new_status}")
    return Decision(True, f"{current_status} → {new_status}")
