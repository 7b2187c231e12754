"""Applying stored events to the ledger: the processor, its outcomes, retries and replays.

Every run of the processor is one outermost SERIALIZABLE transaction that locks
the payout, then the payout's items by id, applies the event and settles the
event's status, all or nothing:

* inline (``event_receive``): a new delivery is stored, applied and settled in the
  same transaction, its attempt included; if that cannot commit, the event is
  stored alone and the inbox takes over;
* a stored event (``event_process``: workers, replays by staff): the event row is
  locked first; its attempt is recorded afterwards, also when it failed.
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
from payouts.services import inbox
from payouts.services.seller_payouts import METADATA_KEY

log = structlog.get_logger(__name__)

LOCK_NOT_AVAILABLE = "55P03"  # NOWAIT found the row locked
# The processor's transaction lasts milliseconds, so the one it collided with has
# usually finished within a few: back off from 10 ms, not the default 100 ms.
RETRY_DELAY_S = 0.01
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


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A delivery not stored yet: the fields of WebhookEvent the processor reads."""

    stripe_event_id: str
    type: str
    account: str
    livemode: bool
    stripe_created: datetime
    attempts: int = 1  # the inline attempt counts
    status: str = Status.RECEIVED

    @classmethod
    def of(cls, payload: dict[str, Any]) -> NewEvent:
        return cls(stripe_event_id=payload["id"], type=payload["type"],
                   account=payload.get("account") or "",
                   livemode=bool(payload.get("livemode", False)),
                   stripe_created=datetime.fromtimestamp(payload["created"], tz=UTC))


AnyEvent = WebhookEvent | NewEvent  # stored, or a delivery being stored inline


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


PAYOUT = Payout._meta.db_table
ITEM = PayoutItem._meta.db_table
TRANSFER = PaymentTransfer._meta.db_table
TRANSACTION = PaymentTransaction._meta.db_table

PAYOUT_LOCK_SQL = f"""
SELECT id, status, last_event_id, last_event_created FROM {PAYOUT}
WHERE stripe_payout_id = %s FOR UPDATE"""

# Everything an applied event changes, in one statement (one round trip). When the
# payout settles, its items are locked by id (the same order for every processor)
# before its transfers, and for a failure its transactions, are updated in bulk:
# the money did not reach the bank, so the transactions are released again.
# The payout is found by its Stripe id, the index page its lock already read: by our
# id, SERIALIZABLE would also read the primary key's page, where the updates of
# neighbouring payouts insert, and report conflicts between unrelated deliveries.
PAYOUT_APPLY_SQL = f"""
WITH payout AS (
    UPDATE {PAYOUT} SET
        status = %(status)s,
        arrival_date = COALESCE(%(arrival_date)s, arrival_date),
        metadata = COALESCE(%(metadata)s::jsonb, metadata),
        failure_code = CASE WHEN %(failed)s THEN %(failure_code)s ELSE failure_code END,
        failure_message = CASE WHEN %(failed)s THEN %(failure_message)s ELSE failure_message END,
        last_event_id = %(event_id)s,
        last_event_type = %(event_type)s,
        last_event_created = %(event_created)s,
        events_applied = events_applied + 1,
        updated_at = now()
    WHERE stripe_payout_id = %(stripe_payout_id)s
), items AS (
    SELECT payment_transfer_id FROM {ITEM}
    WHERE payout_id = %(payout)s AND %(settles)s
    ORDER BY id FOR UPDATE{{lock}}
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

Transfer = PaymentTransfer.Status
# The transfers a settled payout moves, and from which statuses.
TRANSFER_MOVES = {
    transitions.PAID: (Transfer.PAID, [Transfer.PENDING]),
    transitions.FAILED: (Transfer.FAILED, [Transfer.PENDING, Transfer.PAID]),  # not reversed
}


def _lock_clause(nowait: bool) -> str:
    return " NOWAIT" if nowait else ""


def _apply_event(event: AnyEvent, payout_object: dict[str, Any], *,
                 nowait: bool) -> ProcessingOutcome:
    """The seed's eight steps; the caller holds the SERIALIZABLE transaction."""
    stripe_payout_id = payout_object["id"]
    event_created = event.stripe_created

    # Step 1: the payout, locked (after the event's own, when the event was stored first).
    with connection.cursor() as cursor:
        cursor.execute(PAYOUT_LOCK_SQL + _lock_clause(nowait), [stripe_payout_id])
        row = cursor.fetchone()
    if row is None:
        linked = _payout_link(payout_object, nowait=nowait)
        if linked is None:
            return _payout_create(event, payout_object)
        row = (linked.pk, linked.status, linked.last_event_id, linked.last_event_created)
    payout_id, previous_status, last_event_id, last_event_created = row
    txutils.annotate(payout_id=payout_id)

    new_status = transitions.target_status(event.type, str(payout_object.get("status", "")))
    decision = transitions.decide(
        current_status=previous_status, last_event_id=last_event_id,
        last_event_created=last_event_created, event_id=event.stripe_event_id,
        event_created=event_created, new_status=new_status,
    )
    if not decision.apply:
        return ProcessingOutcome(Kind.SKIPPED, decision.reason, payout_id)

    # Steps 2-7: status, arrival date, failure code and message (an open set of codes:
    # any string is kept), ordering bookkeeping, then items, transfers, transactions.
    metadata = payout_object.get("metadata")
    failed = new_status == transitions.FAILED
    settles = new_status != previous_status and new_status in TRANSFER_MOVES
    transfer_status, transfer_from = TRANSFER_MOVES.get(new_status, ("", []))
    with connection.cursor() as cursor:
        cursor.execute(PAYOUT_APPLY_SQL.format(lock=_lock_clause(nowait)), {
            "payout": payout_id, "stripe_payout_id": stripe_payout_id, "status": new_status,
            "arrival_date": _from_unix(payout_object.get("arrival_date")),
            "metadata": json.dumps(metadata) if isinstance(metadata, dict) else None,
            "failed": failed,
            "failure_code": str(payout_object.get("failure_code") or "")[:64],
            "failure_message": str(payout_object.get("failure_message") or ""),
            "event_id": event.stripe_event_id, "event_type": event.type,
            "event_created": event_created, "settles": settles,
            "transfer_status": transfer_status, "transfer_from": transfer_from,
            "release": settles and failed,
        })
        released = cursor.fetchone()[0]
    if settles and failed:
        log.info("payout.transactions_released", payout=stripe_payout_id, count=released)
    log.info("payout.transitioned", payout=stripe_payout_id, stripe_event=event.stripe_event_id,
             from_status=previous_status, to_status=new_status)
    # Step 8: an outcome the caller can act on.
    return ProcessingOutcome(Kind.APPLIED, decision.reason, payout_id)


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


def _payout_create(event: AnyEvent, payout_object: dict[str, Any]) -> ProcessingOutcome:
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
) -> ProcessingOutcome:
    """Run the processor for one stored event and record the attempt. Never raises
    for a processing failure: the failure is the outcome, and the inbox retries."""
    started_at = timezone.now()
    error = tb = ""
    try:
        outcome = _process(event_id, trigger, nowait)
    except Exception as exc:
        _reconnect_if_lost()
        outcome, error, tb = _after_failure(event_id, exc, counted=trigger != Trigger.REPLAY)
    _attempt_record(event_id, trigger, started_at, outcome, error, tb, worker=worker,
                    requested_by=requested_by)
    log.info("webhook.processed", event_pk=event_id, trigger=trigger, outcome=outcome.kind,
             reason=outcome.reason, status=outcome.status_after)
    return outcome


@txutils.financial_transaction(operation="webhook.process_event", delay=RETRY_DELAY_S)
def _process(event_id: int, trigger: str, nowait: bool) -> ProcessingOutcome:
    event = WebhookEvent.objects.select_for_update(nowait=nowait).defer("headers").get(pk=event_id)
    txutils.annotate(event_id=event.pk)
    if event.status == Status.PROCESSED:
        return ProcessingOutcome(Kind.SKIPPED, "already applied", status_after=event.status)
    if trigger != Trigger.REPLAY and event.status not in WebhookEvent.PENDING:
        return ProcessingOutcome(Kind.SKIPPED, f"already {event.status}", status_after=event.status)
    outcome = _run(event, json.loads(bytes(event.raw_body)), nowait=nowait)
    settled = _settlement(event, outcome)
    for field, value in settled.items():
        setattr(event, field, value)
    event.save(update_fields=list(settled))
    return ProcessingOutcome(outcome.kind, outcome.reason, outcome.payout_id, event.status)


def _run(event: AnyEvent, payload: dict[str, Any], *, nowait: bool) -> ProcessingOutcome:
    """What the processor does with an event: apply it, or say why it is ignored."""
    if event.type not in transitions.HANDLED_TYPES:
        return ProcessingOutcome(Kind.IGNORED, f"{event.type} is not handled")
    if event.livemode != settings.STRIPE_LIVEMODE:
        mode = "live" if settings.STRIPE_LIVEMODE else "test"
        return ProcessingOutcome(Kind.IGNORED, f"livemode={event.livemode} on a {mode} deployment")
    return _apply_event(event, payload["data"]["object"], nowait=nowait)


def _settlement(event: AnyEvent, outcome: ProcessingOutcome) -> dict[str, Any]:
    """The event's fields once ``outcome`` is settled, in the processing transaction."""
    now = timezone.now()
    fields: dict[str, Any] = {"status_reason": outcome.reason[:255]}
    if outcome.kind == Kind.RETRY:
        if event.attempts >= settings.WEBHOOK_MAX_ATTEMPTS or event.status == Status.DEAD:
            fields.update(status=Status.DEAD, next_attempt_at=None)
        else:
            fields.update(status=Status.FAILED, next_attempt_at=now + retry_delay(event.attempts))
        fields["last_error"] = outcome.reason
    else:
        status = {Kind.APPLIED: Status.PROCESSED, Kind.SKIPPED: Status.SKIPPED,
                  Kind.IGNORED: Status.IGNORED}[outcome.kind]
        fields.update(status=status, next_attempt_at=None, processed_at=now)
    return fields


def _attempt_record(event_id: int, trigger: str, started_at: datetime,
                    outcome: ProcessingOutcome, error: str = "", tb: str = "", *,
                    worker: str = "", requested_by: AbstractBaseUser | None = None) -> None:
    """Keep one processing attempt on the event's timeline (after its transaction)."""
    WebhookEventAttempt.objects.create(
        event_id=event_id, trigger=trigger, worker=worker, started_at=started_at,
        finished_at=timezone.now(), outcome=outcome.kind, reason=outcome.reason[:255],
        error=error, traceback=tb, status_after=outcome.status_after,
        requested_by=requested_by if requested_by is not None and requested_by.pk else None,
    )


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
        outcome = _event_postpone(event_id, f"busy (SQLSTATE {code}), will retry",
                                  counted=counted)
        return outcome, error, ""
    log.error("webhook.processing_failed", event_pk=event_id, error=error)
    return _event_fail(event_id, error), error, "".join(traceback.format_exception(exc))


# --- inline: store and apply in one transaction ---------------------------------------

EVENT_SETTLED_INSERT_SQL = f"""
WITH event AS (
    INSERT INTO {WebhookEvent._meta.db_table}
        (stripe_event_id, type, account, livemode, api_version, stripe_created,
         stripe_object_id, raw_body, headers, received_at, status, status_reason,
         attempts, next_attempt_at, last_error, processed_at)
    VALUES (%(stripe_event_id)s, %(type)s, %(account)s, %(livemode)s, %(api_version)s,
            %(stripe_created)s, %(stripe_object_id)s, %(raw_body)s, %(headers)s,
            %(received_at)s, %(status)s, %(status_reason)s, %(attempts)s,
            %(next_attempt_at)s, %(last_error)s, %(processed_at)s)
    ON CONFLICT (stripe_event_id) DO NOTHING
    RETURNING id
)
INSERT INTO {WebhookEventAttempt._meta.db_table}
    (event_id, trigger, worker, started_at, finished_at, outcome, reason, error, traceback,
     status_after, requested_by_id)
SELECT id, %(trigger)s, '', %(received_at)s, clock_timestamp(), %(outcome)s, %(status_reason)s,
       '', '', %(status)s, NULL
FROM event
RETURNING event_id"""


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


def event_receive(payload: dict[str, Any], body: bytes, headers: dict[str, str]) -> Received:
    """Inline mode: store a verified event and apply it in ONE SERIALIZABLE transaction.

    The event row is written last, already settled, with its attempt: the common
    delivery costs one commit, and nothing the processor reads can conflict with
    other deliveries being stored. When that transaction cannot commit (the payout
    is busy, conflicts kept coming, an error), the event is stored alone and left to
    the inbox, exactly as a stored event whose processing failed. Raises
    ``DatabaseError`` only when the event could not be stored at all.
    """
    received_at = timezone.now()
    # A duplicate is answered without opening a transaction; the insert still settles
    # a duplicate that arrives while its twin is being stored.
    if inbox.is_stored(payload["id"]):
        return Received(None, None)
    try:
        return _store_and_apply(payload, body, headers, received_at)
    except _AlreadyStored:
        return Received(None, None)
    except Exception as exc:
        failure = exc
    _reconnect_if_lost()
    recorded = inbox.event_record(payload, body, headers,
                                  lease_s=settings.WEBHOOK_LEASE_SECONDS)
    if recorded.event_id is None:
        return Received(None, None)
    try:  # stored: from here on, nothing may undo the acknowledgement
        outcome, error, tb = _after_failure(recorded.event_id, failure, counted=True)
        _attempt_record(recorded.event_id, Trigger.INLINE, received_at, outcome, error, tb)
    except Exception:
        log.exception("webhook.inline_bookkeeping_failed", event_pk=recorded.event_id)
        outcome = ProcessingOutcome(Kind.FAILED, "stored; processing left to the worker",
                                    status_after=Status.RECEIVED)
    return Received(recorded.event_id, outcome)


@txutils.financial_transaction(operation="webhook.process_event", delay=RETRY_DELAY_S)
def _store_and_apply(payload: dict[str, Any], body: bytes, headers: dict[str, str],
                     received_at: datetime) -> Received:
    event = NewEvent.of(payload)
    outcome = _run(event, payload, nowait=True)
    settled = {"next_attempt_at": None, "last_error": "", "processed_at": None,
               **_settlement(event, outcome)}
    with connection.cursor() as cursor:
        cursor.execute(EVENT_SETTLED_INSERT_SQL, {
            "stripe_event_id": event.stripe_event_id, "type": event.type,
            "account": event.account, "livemode": event.livemode,
            "api_version": payload.get("api_version") or "",
            "stripe_created": event.stripe_created,
            "stripe_object_id": payload["data"]["object"].get("id") or "",
            "attempts": event.attempts, "raw_body": body, "headers": json.dumps(headers),
            "received_at": received_at, "trigger": Trigger.INLINE, "outcome": outcome.kind,
            **settled,
        })
        row = cursor.fetchone()
    if row is None:
        raise _AlreadyStored(payload["id"])
    txutils.annotate(event_id=row[0])
    return Received(row[0], ProcessingOutcome(outcome.kind, outcome.reason, outcome.payout_id,
                                              settled["status"]))


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
