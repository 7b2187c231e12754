"""Running the processor: receive a delivery, process a stored event, replay one.

Every run is one outermost SERIALIZABLE transaction that applies the event to the
ledger (``payouts.services.ledger``) and settles the event's status in the inbox
(``payouts.services.inbox``), all or nothing:

* inline (``event_receive``): a new delivery is stored, applied and settled in the
  same transaction, its attempt included; if that cannot commit, the event is
  stored alone and the inbox takes over;
* a stored event (``event_process``: workers, replays by staff): the event row is
  locked first; its attempt is recorded afterwards, also when it failed.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, replace
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.utils import timezone

import txutils
from payouts import transitions
from payouts.models import Seller, WebhookEvent, WebhookEventAttempt
from payouts.services import audit, inbox, ledger
from payouts.services.inbox import NewEvent
from payouts.services.outcome import Outcome, ProcessingOutcome
from payouts.stripe_api import StripeReadError

log = structlog.get_logger(__name__)

LOCK_NOT_AVAILABLE = "55P03"  # NOWAIT found the row locked
# The processor's transaction lasts milliseconds, so the one it collided with has
# usually finished within a few: back off from 10 ms, not the default 100 ms.
RETRY_DELAY_S = 0.01
Trigger = WebhookEventAttempt.Trigger
Status = WebhookEvent.Status


def _run(event: WebhookEvent | NewEvent, payload: dict[str, Any], *,
         nowait: bool) -> ProcessingOutcome:
    """What the processor does with an event: apply it, or say why it is ignored."""
    if event.type not in transitions.HANDLED_TYPES:
        return ProcessingOutcome(Outcome.IGNORED, f"{event.type} is not handled")
    if event.livemode != settings.STRIPE_LIVEMODE:
        mode = "live" if settings.STRIPE_LIVEMODE else "test"
        return ProcessingOutcome(Outcome.IGNORED,
                                 f"livemode={event.livemode} on a {mode} deployment")
    return ledger.apply_event(event, payload["data"]["object"], nowait=nowait)


# --- a stored event ------------------------------------------------------------------------


def event_process(
    *,
    event_id: int,
    trigger: str,
    requested_by: AbstractBaseUser | None = None,
    worker: str = "",
    nowait: bool = False,
) -> ProcessingOutcome:
    """Run the processor for one stored event and record the attempt. Never raises
    for a processing failure: the failure is the outcome, and the inbox retries."""
    started_at = timezone.now()
    error = tb = ""
    try:
        outcome = _process(event_id, trigger, nowait)
        if outcome.missing_payout and settings.STRIPE_API_KEY:
            outcome = _with_payout_fetched(event_id, trigger, nowait, outcome)
    except Exception as exc:
        _reconnect_if_lost()
        outcome, error, tb = _after_failure(event_id, exc, counted=trigger != Trigger.REPLAY)
    inbox.attempt_record(event_id, trigger, started_at, outcome, error, tb, worker=worker,
                         requested_by=requested_by)
    log.info("webhook.processed", event_pk=event_id, trigger=trigger, outcome=outcome.kind,
             reason=outcome.reason, status=outcome.status_after)
    return outcome


@txutils.financial_transaction(operation="webhook.process_event", delay=RETRY_DELAY_S)
def _process(event_id: int, trigger: str, nowait: bool) -> ProcessingOutcome:
    event = WebhookEvent.objects.select_for_update(nowait=nowait).defer("headers").get(pk=event_id)
    txutils.annotate(event_id=event.pk)
    if event.status == Status.PROCESSED:
        return ProcessingOutcome(Outcome.SKIPPED, "already applied", status_after=event.status)
    if trigger != Trigger.REPLAY and event.status not in WebhookEvent.PENDING:
        return ProcessingOutcome(Outcome.SKIPPED, f"already {event.status}",
                                 status_after=event.status)
    outcome = _run(event, json.loads(bytes(event.raw_body)), nowait=nowait)
    status = inbox.event_settle(event, outcome)
    return replace(outcome, status_after=status)


def replay_uncommitted(event_id: int) -> ProcessingOutcome:
    """What a replay does to the ledger and the event, inside the caller's SERIALIZABLE
    transaction, which decides whether any of it stays (``preview`` rolls it back).
    No attempt is recorded and Stripe is not asked for a payout we lack; a locked
    event or payout raises (55P03) rather than waits."""
    assert connection.in_atomic_block, "replay_uncommitted runs inside the caller's transaction"
    return _process(event_id, Trigger.REPLAY, True)


def _with_payout_fetched(event_id: int, trigger: str, nowait: bool,
                         waiting: ProcessingOutcome) -> ProcessingOutcome:
    """The event names a payout we do not know, and Stripe can be asked: fetch it and
    create it (when its seller is known), rather than wait for a ``payout.created``
    that may never come; then run the event again."""
    from payouts.services import stripe_sync  # it stores what it fetches through here

    event = WebhookEvent.objects.only("stripe_event_id", "account", "source",
                                      "stripe_object_id").get(pk=event_id)
    stripe_payout_id = waiting.missing_payout
    if event.source == WebhookEvent.Source.RESYNC and event.stripe_object_id == stripe_payout_id:
        return waiting  # Stripe's own answer for it: asking again would loop
    if event.account and not Seller.objects.filter(stripe_account_id=event.account).exists():
        return waiting  # its payout could not be created yet either
    origin = inbox.Origin(WebhookEvent.Source.RESYNC,
                          f"{event.stripe_event_id} named a payout we did not know")
    try:
        resync_id, fetched = stripe_sync.payout_fetch(stripe_payout_id, account=event.account,
                                                      origin=origin)
    except StripeReadError as exc:
        return replace(waiting, reason=f"{waiting.reason}; asking Stripe for it: {exc}")
    if fetched.missing_payout:  # a reversal whose original we lack too: fetch that now
        fetched = event_process(event_id=WebhookEvent.objects.get(stripe_event_id=resync_id).pk,
                                trigger=Trigger.WORKER, worker="fetch", nowait=nowait)
    if fetched.kind != Outcome.APPLIED:
        return replace(waiting, reason=f"{waiting.reason}; fetched from Stripe as {resync_id}, "
                                       f"which was {fetched.kind}: {fetched.reason}")
    again = _process(event_id, trigger, nowait)
    return replace(again, reason=f"{stripe_payout_id} fetched from Stripe ({resync_id}); "
                                 f"{again.reason}")


def _reconnect_if_lost() -> None:
    """After a failed transaction: drop a connection that was lost, so the next query
    opens a new one."""
    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()


def _after_failure(event_id: int, exc: Exception, *,
                   counted: bool) -> tuple[ProcessingOutcome, str, str]:
    """The processor raised: postpone the event if it was only busy, else fail it.
    Returns the outcome, the error and its traceback (empty when busy)."""
    error = f"{type(exc).__name__}: {exc}".strip()
    code = txutils.sqlstate_of(exc)
    if code == LOCK_NOT_AVAILABLE or code in txutils.RETRYABLE_SQLSTATES:
        # Busy, not broken: another process holds the payout, or kept conflicting.
        outcome = inbox.event_postpone(event_id, f"busy (SQLSTATE {code}), will retry",
                                       counted=counted)
        return outcome, error, ""
    log.error("webhook.processing_failed", event_pk=event_id, error=error)
    return inbox.event_fail(event_id, error), error, "".join(traceback.format_exception(exc))


def event_replay(*, event_id: int, requested_by: AbstractBaseUser,
                 detail: str = "") -> ProcessingOutcome:
    """Staff asked to run an event again: the same processor, recorded with who asked.
    A held event is checked against the ledger again.

    Safe to call twice, or twice at once: the event row lock serialises replays,
    and an applied event is never applied again. The audit keeps who asked, the outcome
    and the payout before and after (``detail``: e.g. the bulk job it was part of).
    """
    log.info("webhook.replay_requested", event_pk=event_id, user=requested_by.get_username())
    event = WebhookEvent.objects.only("stripe_event_id", "stripe_object_id").get(pk=event_id)
    payout = audit.payout_of(event)
    before = audit.payout_state(payout)
    outcome = event_process(event_id=event_id, trigger=Trigger.REPLAY, requested_by=requested_by)
    audit.record(audit.Action.REPLAY, actor=requested_by, target=event.stripe_event_id,
                 outcome=outcome.kind, detail=f"{outcome.reason}{detail}", event=event,
                 payout=payout or audit.payout_of(event), before=before)
    return outcome


# --- inline: store and apply in one transaction ---------------------------------------


@dataclass(frozen=True)
class Received:
    """What became of a delivery in inline mode."""

    event_id: int | None  # None for a duplicate
    outcome: ProcessingOutcome | None  # None for a duplicate

    @property
    def duplicate(self) -> bool:
        return self.event_id is None


class _AlreadyStored(Exception):
    """The event was stored before (a duplicate delivery): undo what this run applied."""


def event_receive(payload: dict[str, Any], body: bytes, headers: dict[str, str], *,
                  origin: inbox.Origin = inbox.DELIVERED, nowait: bool = True) -> Received:
    """Inline mode: store a verified event and apply it in ONE SERIALIZABLE transaction.

    The event row is written last, already settled, with its attempt: the common
    delivery costs one commit, and nothing the processor reads can conflict with
    other deliveries being stored. When that transaction cannot commit (the payout
    is busy, conflicts kept coming, an error), the event is stored alone and left to
    the inbox, exactly as a stored event whose processing failed. Raises
    ``DatabaseError`` only when the event could not be stored at all.

    ``nowait``: a busy payout fails the transaction at once, for a delivery (Stripe
    waits on the answer); events we fetched or made ourselves wait for the lock.
    """
    received_at = timezone.now()
    # A duplicate is answered without opening a transaction; the insert still settles
    # a duplicate that arrives while its twin is being stored.
    if inbox.is_stored(payload["id"]):
        return Received(None, None)
    try:
        return _store_and_apply(payload, body, headers,
                                NewEvent.of(payload, received_at, origin), nowait)
    except _AlreadyStored:
        return Received(None, None)
    except Exception as exc:
        failure = exc
    _reconnect_if_lost()
    recorded = inbox.event_record(payload, body, headers,
                                  lease_s=settings.WEBHOOK_LEASE_SECONDS, origin=origin)
    if recorded.event_id is None:
        return Received(None, None)
    try:  # stored: from here on, nothing may undo the acknowledgement
        outcome, error, tb = _after_failure(recorded.event_id, failure, counted=True)
        inbox.attempt_record(recorded.event_id, Trigger.INLINE, received_at, outcome, error, tb)
    except Exception:
        log.exception("webhook.inline_bookkeeping_failed", event_pk=recorded.event_id)
        outcome = ProcessingOutcome(Outcome.FAILED, "stored; processing left to the worker",
                                    status_after=Status.RECEIVED)
    return Received(recorded.event_id, outcome)


@txutils.financial_transaction(operation="webhook.process_event", delay=RETRY_DELAY_S)
def _store_and_apply(payload: dict[str, Any], body: bytes, headers: dict[str, str],
                     event: NewEvent, nowait: bool) -> Received:
    outcome = _run(event, payload, nowait=nowait)
    stored = inbox.event_store_settled(event, outcome, payload, body, headers)
    if stored is None:
        raise _AlreadyStored(payload["id"])
    event_id, status = stored
    txutils.annotate(event_id=event_id)
    return Received(event_id, replace(outcome, status_after=status))
