"""Applying stored events to the ledger: the processor, its outcomes, retries and replays.

Every run of the processor, whoever asked for it (inline after the delivery,
a worker, a replay by staff), goes through ``event_process``: one outermost
SERIALIZABLE transaction that locks the event, then the payout, then the
payout's items by id, applies the event and settles the event's status, all
or nothing. Its attempt is recorded afterwards, also when it failed.
"""

from __future__ import annotations

import json
import random
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

import txutils
from payouts import transitions
from payouts.models import (
    PaymentTransaction,
    PaymentTransfer,
    Payout,
    PayoutItem,
    Seller,
    WebhookEvent,
    WebhookEventAttempt,
)
from payouts.services.seller_payouts import METADATA_KEY

log = structlog.get_logger(__name__)

LOCK_NOT_AVAILABLE = "55P03"  # NOWAIT found the row locked
Trigger = WebhookEventAttempt.Trigger
Status = WebhookEvent.Status


class Kind(StrEnum):
    APPLIED = "applied"
    SKIPPED = "skipped"
    IGNORED = "ignored"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True)
class ProcessingOutcome:
    """What processing an event did: the caller can tell every case apart."""

    kind: Kind
    reason: str
    payout_id: int | None = None
    status_after: str = ""  # the event's status once settled


def _from_unix(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if isinstance(value, int) else None


# --- the ledger update --------------------------------------------------------------


@txutils.financial_transaction(operation="payout.apply_event")
def update_payout_from_webhook(
    event: WebhookEvent, payout_object: dict[str, Any], *, nowait: bool = False
) -> ProcessingOutcome:
    """Apply one payout event to its payout, in one SERIALIZABLE transaction retried
    whole on 40001/40P01. Applying the same event again changes nothing. ``nowait``
    makes a locked payout an error (55P03) instead of a wait, for callers that must
    answer quickly. (``event_process`` runs the same steps inside its own transaction.)
    """
    return _apply_event(event, payout_object, nowait=nowait)


def _apply_event(event: WebhookEvent, payout_object: dict[str, Any], *,
                 nowait: bool) -> ProcessingOutcome:
    """The seed's eight steps; the caller holds the SERIALIZABLE transaction."""
    stripe_payout_id = payout_object["id"]
    event_created = event.stripe_created

    # Step 1: the payout, locked (first lock after the event's own).
    payout = (Payout.objects.select_for_update(nowait=nowait)
              .filter(stripe_payout_id=stripe_payout_id).first())
    if payout is None:
        payout = _payout_link(payout_object, nowait=nowait)
    if payout is None:
        return _payout_create(event, payout_object)
    txutils.annotate(payout_id=payout.pk)

    new_status = transitions.target_status(event.type, str(payout_object.get("status", "")))
    decision = transitions.decide(
        current_status=payout.status, last_event_id=payout.last_event_id,
        last_event_created=payout.last_event_created, event_id=event.stripe_event_id,
        event_created=event_created, new_status=new_status,
    )
    if not decision.apply:
        return ProcessingOutcome(Kind.SKIPPED, decision.reason, payout.pk)

    previous_status = payout.status
    # Step 2: status. Step 3: arrival date.
    payout.status = new_status
    payout.arrival_date = _from_unix(payout_object.get("arrival_date")) or payout.arrival_date
    if isinstance(payout_object.get("metadata"), dict):
        payout.metadata = payout_object["metadata"]
    # Step 4: failure code and message (an open set of codes: any string is kept).
    if new_status == transitions.FAILED:
        payout.failure_code = str(payout_object.get("failure_code") or "")[:64]
        payout.failure_message = str(payout_object.get("failure_message") or "")
    # Step 5: ordering bookkeeping.
    payout.last_event_id = event.stripe_event_id
    payout.last_event_type = event.type
    payout.last_event_created = event_created
    payout.events_applied += 1
    payout.save()

    # Steps 6-7: items locked by id, then one bulk statement per table.
    if new_status != previous_status and new_status in (transitions.PAID, transitions.FAILED):
        list(PayoutItem.objects.select_for_update(nowait=nowait).filter(payout=payout)
             .order_by("id").values_list("id", flat=True))
        transfers = PaymentTransfer.objects.filter(payout_items__payout=payout)
        if new_status == transitions.FAILED:
            # The money did not reach the bank: release the transactions again.
            reset = PaymentTransaction.objects.filter(
                transfers__payout_items__payout=payout, payed_out=True
            ).update(payed_out=False, actual_release_date=None)
            transfers.exclude(status=PaymentTransfer.Status.REVERSED).update(
                status=PaymentTransfer.Status.FAILED)
            log.info("payout.transactions_released", payout=stripe_payout_id, count=reset)
        else:
            transfers.filter(status=PaymentTransfer.Status.PENDING).update(
                status=PaymentTransfer.Status.PAID)

    log.info("payout.transitioned", payout=stripe_payout_id, stripe_event=event.stripe_event_id,
             from_status=previous_status, to_status=new_status)
    # Step 8: an outcome the caller can act on.
    return ProcessingOutcome(Kind.APPLIED, decision.reason, payout.pk)


def _payout_link(payout_object: dict[str, Any], *, nowait: bool) -> Payout | None:
    """A payout we created whose Stripe id we have not recorded yet (the webhook beat
    our phase 3): found by our reference in the payout's metadata, and linked."""
    metadata = payout_object.get("metadata")
    reference = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(reference, str) or not reference:
        return None
    payout = (Payout.objects.select_for_update(nowait=nowait)
              .filter(reference=reference, stripe_payout_id__isnull=True).first())
    if payout is not None:
        payout.stripe_payout_id = payout_object["id"]
        payout.save(update_fields=["stripe_payout_id", "updated_at"])
        log.info("payout.linked", payout=payout_object["id"], reference=reference)
    return payout


def _payout_create(event: WebhookEvent, payout_object: dict[str, Any]) -> ProcessingOutcome:
    """An unknown payout: created from ``payout.created``; any other event waits for it,
    because a webhook can beat the commit of a payout we are creating ourselves."""
    stripe_payout_id = payout_object["id"]
    if event.type != "payout.created":
        return ProcessingOutcome(Kind.RETRY, f"payout {stripe_payout_id} is not known yet")
    seller = None
    if event.account:
        seller = Seller.objects.filter(stripe_account_id=event.account).first()
        if seller is None:
            return ProcessingOutcome(Kind.RETRY, f"seller {event.account} is not known yet")
    payout = Payout.objects.create(
        seller=seller,
        stripe_payout_id=stripe_payout_id,
        amount=int(payout_object.get("amount") or 0),
        currency=str(payout_object.get("currency") or "")[:3],
        status=str(payout_object.get("status") or transitions.PENDING),
        arrival_date=_from_unix(payout_object.get("arrival_date")),
        failure_code=str(payout_object.get("failure_code") or "")[:64],
        failure_message=str(payout_object.get("failure_message") or ""),
        metadata=payout_object.get("metadata") or {},
        last_event_id=event.stripe_event_id,
        last_event_type=event.type,
        last_event_created=event.stripe_created,
        events_applied=1,
    )
    txutils.annotate(payout_id=payout.pk)
    log.info("payout.created", payout=stripe_payout_id, stripe_event=event.stripe_event_id)
    return ProcessingOutcome(Kind.APPLIED, "created", payout.pk)


# --- processing an event from the inbox ----------------------------------------------


def retry_delay(attempts: int) -> timedelta:
    """Exponential backoff with jitter (half fixed, half random), capped."""
    base = float(settings.WEBHOOK_RETRY_BASE_SECONDS)
    ceiling = min(float(settings.WEBHOOK_RETRY_MAX_SECONDS), base * 2 ** max(attempts - 1, 0))
    return timedelta(seconds=ceiling / 2 + random.uniform(0, ceiling / 2))


def event_process(
    *,
    event_id: int,
    trigger: str,
    requested_by: AbstractBaseUser | None = None,
    worker: str = "",
    nowait: bool = False,
    payload: dict[str, Any] | None = None,
) -> ProcessingOutcome:
    """Run the processor for one stored event and record the attempt. Never raises
    for a processing failure: the failure is the outcome, and the inbox retries."""
    started_at = timezone.now()
    error = tb = ""
    try:
        outcome = _process(event_id, trigger, nowait, payload)
    except Exception as exc:
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()  # reconnect after a lost connection
        error = f"{type(exc).__name__}: {exc}".strip()
        code = txutils.sqlstate_of(exc)
        if code == LOCK_NOT_AVAILABLE or code in txutils.RETRYABLE_SQLSTATES:
            # Busy, not broken: another process holds the payout, or kept conflicting.
            outcome = _event_postpone(event_id, f"busy (SQLSTATE {code}), will retry",
                                      counted=trigger != Trigger.REPLAY)
        else:
            tb = traceback.format_exc()
            outcome = _event_fail(event_id, error)
            log.error("webhook.processing_failed", event_pk=event_id, error=error)
    WebhookEventAttempt.objects.create(
        event_id=event_id, trigger=trigger, worker=worker, started_at=started_at,
        finished_at=timezone.now(), outcome=outcome.kind, reason=outcome.reason[:255],
        error=error, traceback=tb, status_after=outcome.status_after,
        requested_by=requested_by if requested_by is not None and requested_by.pk else None,
    )
    log.info("webhook.processed", event_pk=event_id, trigger=trigger, outcome=outcome.kind,
             reason=outcome.reason, status=outcome.status_after)
    return outcome


@txutils.financial_transaction(operation="webhook.process_event")
def _process(event_id: int, trigger: str, nowait: bool,
             payload: dict[str, Any] | None) -> ProcessingOutcome:
    event = WebhookEvent.objects.select_for_update(nowait=nowait).get(pk=event_id)
    txutils.annotate(event_id=event.pk)
    if event.status == Status.PROCESSED:
        return ProcessingOutcome(Kind.SKIPPED, "already applied", status_after=event.status)
    if trigger != Trigger.REPLAY and event.status not in WebhookEvent.PENDING:
        return ProcessingOutcome(Kind.SKIPPED, f"already {event.status}", status_after=event.status)

    if event.type not in transitions.HANDLED_TYPES:
        outcome = ProcessingOutcome(Kind.IGNORED, f"{event.type} is not handled")
    elif event.livemode != settings.STRIPE_LIVEMODE:
        mode = "live" if settings.STRIPE_LIVEMODE else "test"
        outcome = ProcessingOutcome(Kind.IGNORED,
                                    f"livemode={event.livemode} on a {mode} deployment")
    else:
        if payload is None:
            payload = json.loads(bytes(event.raw_body))
        outcome = _apply_event(event, payload["data"]["object"], nowait=nowait)
    return _event_settle(event, outcome)


def _event_settle(event: WebhookEvent, outcome: ProcessingOutcome) -> ProcessingOutcome:
    """Set the event's status from the outcome, in the processing transaction."""
    now = timezone.now()
    if outcome.kind == Kind.RETRY:
        if event.attempts >= settings.WEBHOOK_MAX_ATTEMPTS or event.status == Status.DEAD:
            event.status, event.next_attempt_at = Status.DEAD, None
        else:
            event.status = Status.FAILED
            event.next_attempt_at = now + retry_delay(event.attempts)
        event.last_error = outcome.reason
    else:
        event.status = {Kind.APPLIED: Status.PROCESSED, Kind.SKIPPED: Status.SKIPPED,
                        Kind.IGNORED: Status.IGNORED}[outcome.kind]
        event.next_attempt_at = None
        event.processed_at = now
    event.status_reason = outcome.reason[:255]
    event.save(update_fields=["status", "status_reason", "next_attempt_at", "last_error",
                              "processed_at"])
    return ProcessingOutcome(outcome.kind, outcome.reason, outcome.payout_id, event.status)


def _event_postpone(event_id: int, reason: str, *, counted: bool) -> ProcessingOutcome:
    """Busy, not broken: try again soon. ``counted``: this attempt was counted against
    WEBHOOK_MAX_ATTEMPTS (inline and worker attempts are, replays are not); it is
    given back, so contention alone never makes an event dead."""
    delay = timedelta(seconds=random.uniform(0.5, 2.0))
    with transaction.atomic():
        event = WebhookEvent.objects.select_for_update().get(pk=event_id)
        if event.status in WebhookEvent.PENDING:
            event.next_attempt_at = timezone.now() + delay
            if counted and event.attempts > 0:
                event.attempts -= 1
            event.save(update_fields=["next_attempt_at", "attempts"])
    return ProcessingOutcome(Kind.RETRY, reason, status_after=event.status)


def _event_fail(event_id: int, error: str) -> ProcessingOutcome:
    """The processor raised: schedule a retry with backoff, or give up (dead)."""
    with transaction.atomic():
        event = WebhookEvent.objects.select_for_update().get(pk=event_id)
        event.last_error = error
        if event.status in WebhookEvent.PENDING:
            if event.attempts >= settings.WEBHOOK_MAX_ATTEMPTS:
                event.status, event.next_attempt_at = Status.DEAD, None
            else:
                event.status = Status.FAILED
                event.next_attempt_at = timezone.now() + retry_delay(event.attempts)
        event.save(update_fields=["status", "next_attempt_at", "last_error"])
    return ProcessingOutcome(Kind.FAILED, error, status_after=event.status)


def event_replay(*, event_id: int, requested_by: AbstractBaseUser) -> ProcessingOutcome:
    """Staff asked to run an event again: the same processor, recorded with who asked.

    Safe to call twice, or twice at once: the event row lock serialises replays,
    and an applied event is never applied again.
    """
    log.info("webhook.replay_requested", event_pk=event_id, user=requested_by.get_username())
    return event_process(event_id=event_id, trigger=Trigger.REPLAY, requested_by=requested_by)
