"""What a run of the processor did: one vocabulary for the ledger, the inbox and callers."""

from __future__ import annotations

from dataclasses import dataclass

from payouts.models import WebhookEventAttempt

Outcome = WebhookEventAttempt.Outcome


@dataclass(frozen=True)
class ProcessingOutcome:
    """What processing an event did: the caller can tell every case apart."""

    kind: Outcome
    reason: str
    payout_id: int | None = None
    status_after: str = ""  # the event's status once settled
    # The Stripe payout (po_…) the event waits for, when we do not know it: it may be
    # fetched from Stripe instead of waiting for its payout.created.
    missing_payout: str = ""
