"""The webhook inbox: every write to the event table, and the retry and dead policy.

* Receiving: verify a delivery, store it once, count what is refused. Nothing here
  parses more than it must or writes anything for a delivery that is not signed with
  one of our secrets: refusals are counted in memory and added to one row per reason
  every few seconds (``RejectionCounter``), never one write per refused request.
* Settling: an event's status after each run of the processor, its attempts on the
  timeline, staff dismissals.
* The workers' queue: claiming due events, and settling attempts whose worker died.

When an event is tried again, or given up (``dead``), is decided by ``retry_at``
alone, for inline processing, workers and abandoned attempts alike.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
import structlog
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import Error as DatabaseFailure
from django.db import connection, transaction
from django.utils import timezone

from payouts import metrics
from payouts.models import RejectionMinute, WebhookEvent, WebhookEventAttempt, WebhookRejection
from payouts.services import audit
from payouts.services.outcome import Outcome, ProcessingOutcome

log = structlog.get_logger(__name__)

EVENT = WebhookEvent._meta.db_table
ATTEMPT = WebhookEventAttempt._meta.db_table
Status = WebhookEvent.Status
Trigger = WebhookEventAttempt.Trigger

MAX_BODY_BYTES = 1024 * 1024
# A signature's timestamp may be this far in the past (replays) or in the future (clock skew).
SIGNATURE_TOLERANCE_S = 300
# Stripe's events nest a few levels (event > data > object > a sub-object > ...). A signed
# body nested deeper is refused before anything stores or re-parses it: every later
# json.loads / json.dumps of it (processing, the console's event page) then stays far
# from Python's recursion limit.
MAX_JSON_DEPTH = 64

# Headers worth keeping for staff; signatures are reduced to their timestamp.
KEPT_HEADERS = ("content-type", "content-length", "user-agent", "stripe-signature",
                "x-forwarded-for", "x-request-id", "host")


class Rejected(Exception):
    """A delivery we refuse: ``reason`` is a fixed, short code; ``detail`` says more."""

    def __init__(self, reason: str, detail: str, status: int = 400) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status


def verify_delivery(
    body: bytes, signature_header: str | None, secrets: list[str]
) -> dict[str, Any]:
    """Return the parsed event if ``body`` is a signed Stripe event; raise ``Rejected`` if not."""
    if not secrets:
        raise Rejected("not_configured", "no STRIPE_WEBHOOK_SECRET is configured", status=503)
    if not signature_header:
        raise Rejected("missing_signature", "no Stripe-Signature header")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("invalid_utf8", "the body is not valid UTF-8") from None
    _check_signature(text, signature_header, secrets)
    payload = parse_json(text)
    problem = event_shape_problem(payload)
    if problem:
        raise Rejected("not_an_event", problem)
    return payload  # type: ignore[no-any-return]


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # Python's json accepts NaN and Infinity


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):  # 1e999: JSON, but no float (nor PostgreSQL's jsonb) holds it
        raise ValueError(f"{number[:20]} is too large a number")
    return value


def parse_json(text: str) -> Any:
    """The JSON value of a signed body; ``Rejected`` (a 400) for anything that is not
    plain JSON nested at most MAX_JSON_DEPTH levels: never an exception of its own."""
    too_deep = Rejected("too_deep", f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        payload = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:  # thousands of levels: the parser gives up before we could count
        raise too_deep from None
    except ValueError as exc:
        raise Rejected("invalid_json", f"the body is not JSON ({str(exc)[:200]})") from None
    if _nested_deeper_than(payload, MAX_JSON_DEPTH):
        raise too_deep
    return payload


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` has containers more than ``limit`` deep (iteratively: no recursion)."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _signed_at(header: str) -> int:
    """The header's ``t=``, read as stripe-python reads it (the first ``t`` item)."""
    items = [item.split("=", 2) for item in header.split(",")]
    return int(next(item[1] for item in items if item[0] == "t"))


def _check_signature(text: str, header: str, secrets: list[str]) -> None:
    messages = []
    for secret in secrets:  # several while a secret is being rolled
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, SIGNATURE_TOLERANCE_S)
        except stripe.SignatureVerificationError as exc:
            messages.append(str(exc))
            continue
        # stripe-python refuses only timestamps too old. A future one is checked here,
        # after a signature matched, as the age is: the reason is then true (the body is
        # ours, only its time is wrong) and unsigned junk is ``bad_signature`` whatever
        # its ``t`` says, so nothing about the time can be probed without the secret.
        if _signed_at(header) > time.time() + SIGNATURE_TOLERANCE_S:
            raise Rejected("future_timestamp", "the signature timestamp is more than "
                           f"{SIGNATURE_TOLERANCE_S} s in the future")
        return
    # stripe-python checks the timestamp only once a signature matched.
    if any("tolerance" in m for m in messages):
        raise Rejected("stale_timestamp",
                       f"the signature timestamp is older than {SIGNATURE_TOLERANCE_S} s")
    if any("Unable to extract" in m or "expected scheme" in m for m in messages):
        raise Rejected("malformed_signature", "the Stripe-Signature header cannot be read")
    raise Rejected("bad_signature", "no signature matches a configured secret")


MAX_UNIX_TIME = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime can hold


def _storable_text(value: Any, max_length: int, prefix: str = "") -> bool:
    """A string PostgreSQL can store in a text column: no NUL, no lone surrogate."""
    if not (isinstance(value, str) and value.startswith(prefix) and len(value) <= max_length):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def event_shape_problem(payload: Any) -> str | None:
    """What makes ``payload`` not a Stripe v1 event we can store, or None."""
    if not isinstance(payload, dict):
        return "the JSON is not an object"
    if payload.get("object") != "event":
        return f"object is {payload.get('object')!r}, not 'event'"
    event_type, created = payload.get("type"), payload.get("created")
    if not _storable_text(payload.get("id"), 255, prefix="evt_"):
        return "id is not an evt_ id"
    if not (_storable_text(event_type, 100) and event_type):
        return "type is missing"
    if (not isinstance(created, int) or isinstance(created, bool)
            or not 0 < created <= MAX_UNIX_TIME):
        return "created is not a Unix time"
    for field in ("account", "api_version"):
        value = payload.get(field)
        if value is not None and not _storable_text(value, 64):
            return f"{field} is not a string"
    if not isinstance(payload.get("livemode", False), bool):
        return "livemode is not a boolean"
    data = payload.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        return "data.object is missing"
    obj = data["object"]
    if event_type.startswith("payout."):
        if obj.get("object") != "payout" or not _storable_text(obj.get("id"), 64, prefix="po_"):
            return "a payout event without a payout (po_) in data.object"
    elif obj.get("id") is not None and not _storable_text(obj.get("id"), 255):
        return "data.object.id is not a string"
    return None


def sanitised_headers(headers: Any) -> dict[str, str]:
    kept = {}
    for name in KEPT_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if name == "stripe-signature":
            value = ",".join(part for part in value.split(",") if part.startswith("t=")) + ",v1=…"
        kept[name] = value[:500]
    return kept


# --- storing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """How an event reached us, and who or what asked for it when we fetched or made it."""

    source: str = WebhookEvent.Source.DELIVERY
    detail: str = ""
    requested_by_id: int | None = None

    def columns(self) -> dict[str, Any]:
        return {"source": self.source, "source_detail": self.detail[:200],
                "requested_by_id": self.requested_by_id}


DELIVERED = Origin()


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A delivery not stored yet: the fields of WebhookEvent the processor reads."""

    stripe_event_id: str
    type: str
    account: str
    livemode: bool
    stripe_created: datetime
    received_at: datetime
    origin: Origin = DELIVERED
    attempts: int = 1  # the inline attempt counts
    status: str = Status.RECEIVED

    @classmethod
    def of(cls, payload: dict[str, Any], received_at: datetime,
           origin: Origin = DELIVERED) -> NewEvent:
        return cls(stripe_event_id=payload["id"], type=payload["type"],
                   account=payload.get("account") or "",
                   livemode=bool(payload.get("livemode", False)),
                   stripe_created=datetime.fromtimestamp(payload["created"], tz=UTC),
                   received_at=received_at, origin=origin)


@dataclass(frozen=True)
class Recorded:
    event_id: int | None  # our primary key; None for a duplicate
    duplicate: bool


def event_record(payload: dict[str, Any], body: bytes, headers: dict[str, str], *,
                 lease_s: float, origin: Origin = DELIVERED) -> Recorded:
    """Store a verified event once (its id is unique); a duplicate changes nothing.

    ``lease_s`` > 0 keeps workers off the event for that long, because the request
    processes it right away (inline mode); it counts as the first attempt.
    """
    obj = payload["data"]["object"]
    created = datetime.fromtimestamp(payload["created"], tz=UTC)
    due = datetime.now(UTC) + timedelta(seconds=lease_s)
    with connection.cursor() as cursor:
        # One statement: concurrent duplicates cannot both insert, and none overwrites.
        cursor.execute(
            f"""
            INSERT INTO {EVENT}
                (stripe_event_id, type, account, livemode, api_version, stripe_created,
                 stripe_object_id, raw_body, headers, received_at, status, status_reason,
                 attempts, next_attempt_at, claimed_by, last_error, source, source_detail,
                 requested_by_id)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now(), 'received', '', %s, %s, %s, '',
                    %s, %s, %s)
            ON CONFLICT (stripe_event_id) DO NOTHING
            RETURNING id
            """,
            [payload["id"], payload["type"], payload.get("account") or "",
             bool(payload.get("livemode", False)), payload.get("api_version") or "", created,
             obj.get("id") or "", body, json.dumps(headers),
             1 if lease_s > 0 else 0, due, "inline" if lease_s > 0 else "",
             origin.source, origin.detail[:200], origin.requested_by_id],
        )
        row = cursor.fetchone()
    if row is None:
        return Recorded(event_id=None, duplicate=True)
    return Recorded(event_id=row[0], duplicate=False)


def is_stored(stripe_event_id: str) -> bool:
    """Whether an event with this id is in the inbox already (a duplicate delivery)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT 1 FROM {EVENT} WHERE stripe_event_id = %s", [stripe_event_id])
        return cursor.fetchone() is not None


# --- counting refusals ------------------------------------------------------------------------

REJECTION = WebhookRejection._meta.db_table
REJECTION_MINUTE = RejectionMinute._meta.db_table

# Counts added in one statement, reasons in order (two processes flushing at once lock the
# rows in the same order). A row per reason: the reasons are this module's fixed codes,
# never taken from the request, so junk cannot add rows. The same counts go to the
# reason's row of the current minute too (the alert job's window: a burst of refusals).
REJECTIONS_ADD_SQL = f"""
WITH counts AS (
    SELECT * FROM unnest(%s::varchar[], %s::bigint[], %s::timestamptz[])
        AS c(reason, count, last_seen_at)
), totals AS (
    INSERT INTO {REJECTION} AS r (reason, count, last_seen_at)
    SELECT reason, count, last_seen_at FROM counts
    ON CONFLICT (reason) DO UPDATE
    SET count = r.count + EXCLUDED.count,
        last_seen_at = GREATEST(r.last_seen_at, EXCLUDED.last_seen_at)
)
INSERT INTO {REJECTION_MINUTE} AS m (reason, minute, count)
SELECT reason, date_trunc('minute', now()), count FROM counts
ON CONFLICT (reason, minute) DO UPDATE SET count = m.count + EXCLUDED.count
"""


def rejections_add(counts: dict[str, tuple[int, datetime]]) -> None:
    """Add ``{reason: (count, last seen)}`` to the counters, in one statement."""
    reasons = sorted(counts)
    with connection.cursor() as cursor:
        cursor.execute(REJECTIONS_ADD_SQL, [reasons, [counts[r][0] for r in reasons],
                                            [counts[r][1] for r in reasons]])


class RejectionCounter:
    """Refused deliveries counted in memory, per process, and added to the table (one
    row per reason) at most every WEBHOOK_REJECTION_FLUSH_SECONDS by a background
    thread, and when the process exits.

    Counting one refusal is a dict update under a lock: a flood of junk costs the
    database one statement per process per interval, not a write per request on one
    hot row (the bench's ``flood`` section). The table is that much behind; a process
    killed outright (SIGKILL) loses at most its last interval's counts. With an
    interval of 0 each refusal is written at once, in the request (the tests' setting).
    """

    def __init__(self) -> None:
        self._reset()
        atexit.register(self._flush_at_exit)
        if hasattr(os, "register_at_fork"):
            # A forked child starts empty: its parent's counts are the parent's to add.
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        # Held across a flush's taking and writing: the exit flush waits for one under way.
        self._flushing = threading.Lock()
        self._pending: dict[str, tuple[int, datetime]] = {}
        self._thread: threading.Thread | None = None

    @staticmethod
    def interval() -> float:
        return float(getattr(settings, "WEBHOOK_REJECTION_FLUSH_SECONDS", 5.0))

    def add(self, reason: str) -> None:
        interval = self.interval()
        if interval <= 0:  # one write per refusal, in the request
            try:
                rejections_add({reason: (1, timezone.now())})
            except DatabaseFailure as exc:
                log.warning("webhook.rejections_not_written", reasons=[reason],
                            error=str(exc).strip()[:300])
            return
        with self._lock:
            count, _ = self._pending.get(reason, (0, None))
            self._pending[reason] = (count + 1, timezone.now())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, args=(interval,),
                                                name="webhook-rejections", daemon=True)
                self._thread.start()

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {reason: count for reason, (count, _) in self._pending.items()}

    def flush(self) -> int:
        """Add what was counted since the last flush to the table; refusals added. If the
        database cannot take them, they are kept for the next flush."""
        with self._flushing:
            with self._lock:
                taken, self._pending = self._pending, {}
            if not taken:
                return 0
            try:
                rejections_add(taken)
            except DatabaseFailure as exc:  # DatabaseError, InterfaceError (a closed connection)
                with self._lock:
                    for reason, (count, seen) in taken.items():
                        now_count, now_seen = self._pending.get(reason, (0, seen))
                        self._pending[reason] = (now_count + count, max(seen, now_seen))
                log.warning("webhook.rejections_not_written", reasons=sorted(taken),
                            error=str(exc).strip()[:300])
                return 0
            return sum(count for count, _ in taken.values())

    def _run(self, interval: float) -> None:
        from django.db import connections

        while True:
            time.sleep(interval)
            try:
                self.flush()
                connections.close_all()  # this thread's own connection: none held between
            except Exception:  # the thread outlives any surprise, to count on
                log.exception("webhook.rejections_flush_failed")

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except Exception:  # at exit the database may be gone already
            log.warning("webhook.rejections_lost_at_exit", counts=self.pending())


rejections = RejectionCounter()


def rejection_count(reason: str) -> None:
    """Count a refused delivery (see ``RejectionCounter``)."""
    rejections.add(reason)


# The inline path: a new event written last in its processing transaction, already
# settled, with its attempt, in one statement. A duplicate inserts nothing.
SETTLED_INSERT_SQL = f"""
WITH event AS (
    INSERT INTO {EVENT}
        (stripe_event_id, type, account, livemode, api_version, stripe_created,
         stripe_object_id, raw_body, headers, received_at, status, status_reason,
         attempts, next_attempt_at, claimed_by, last_error, processed_at, source,
         source_detail, requested_by_id)
    VALUES (%(stripe_event_id)s, %(type)s, %(account)s, %(livemode)s, %(api_version)s,
            %(stripe_created)s, %(stripe_object_id)s, %(raw_body)s, %(headers)s,
            %(received_at)s, %(status)s, %(status_reason)s, %(attempts)s,
            %(next_attempt_at)s, '', %(last_error)s, %(processed_at)s, %(source)s,
            %(source_detail)s, %(requested_by_id)s)
    ON CONFLICT (stripe_event_id) DO NOTHING
    RETURNING id
)
INSERT INTO {ATTEMPT}
    (event_id, trigger, worker, started_at, finished_at, outcome, reason, error, traceback,
     status_after, requested_by_id)
SELECT id, %(trigger)s, '', %(received_at)s, clock_timestamp(), %(outcome)s, %(status_reason)s,
       '', '', %(status)s, %(requested_by_id)s
FROM event
RETURNING event_id"""


def event_store_settled(event: NewEvent, outcome: ProcessingOutcome, payload: dict[str, Any],
                        body: bytes, headers: dict[str, str]) -> tuple[int, str] | None:
    """Inline mode: store a new event already settled by ``outcome``, with its attempt,
    inside the processing transaction. Returns its id and status, or None when another
    delivery stored it first."""
    settled = {"next_attempt_at": None, "last_error": "", "processed_at": None,
               **settlement(event, outcome, event.received_at)}
    with connection.cursor() as cursor:
        cursor.execute(SETTLED_INSERT_SQL, {
            "stripe_event_id": event.stripe_event_id, "type": event.type,
            "account": event.account, "livemode": event.livemode,
            "api_version": payload.get("api_version") or "",
            "stripe_created": event.stripe_created,
            "stripe_object_id": payload["data"]["object"].get("id") or "",
            "attempts": event.attempts, "raw_body": body, "headers": json.dumps(headers),
            "received_at": event.received_at, "trigger": Trigger.INLINE,
            "outcome": outcome.kind, **settled, **event.origin.columns(),
        })
        row = cursor.fetchone()
    return None if row is None else (row[0], settled["status"])


# --- the retry and dead policy ---------------------------------------------------------------


def retry_delay(attempts: int) -> timedelta:
    """Exponential backoff with jitter (half fixed, half random), capped."""
    base = float(settings.WEBHOOK_RETRY_BASE_SECONDS)
    ceiling = min(float(settings.WEBHOOK_RETRY_MAX_SECONDS), base * 2 ** max(attempts - 1, 0))
    return timedelta(seconds=ceiling / 2 + random.uniform(0, ceiling / 2))


def gives_up_at(received_at: datetime) -> datetime:
    """The earliest time an event received then may be given up."""
    return received_at + timedelta(hours=settings.WEBHOOK_RETRY_HORIZON_HOURS)


def retry_at(*, attempts: int, received_at: datetime, now: datetime) -> datetime | None:
    """After a failed attempt: when to try again, or None to give up (``dead``).

    Retries back off exponentially. An event is given up only once it has had
    WEBHOOK_MAX_ATTEMPTS attempts AND WEBHOOK_RETRY_HORIZON_HOURS (72) have passed
    since it was received: a payout or seller it waits for can come as late as
    Stripe keeps redelivering (3 days).
    """
    if attempts >= settings.WEBHOOK_MAX_ATTEMPTS and now >= gives_up_at(received_at):
        return None
    return now + retry_delay(attempts)


def _failed_attempt(event: NewEvent | WebhookEvent, error: str, now: datetime) -> dict[str, Any]:
    """The event's fields after an attempt that failed or must wait. A dead event stays
    dead (a replay failed again); others are retried or given up by ``retry_at``."""
    if event.status == Status.DEAD:
        return {"status": Status.DEAD, "next_attempt_at": None, "last_error": error}
    when = retry_at(attempts=event.attempts, received_at=event.received_at, now=now)
    return {"status": Status.FAILED if when else Status.DEAD, "next_attempt_at": when,
            "last_error": error}


# --- settling ---------------------------------------------------------------------------------

STATUS_AFTER = {Outcome.APPLIED: Status.PROCESSED, Outcome.SKIPPED: Status.SKIPPED,
                Outcome.IGNORED: Status.IGNORED, Outcome.HELD: Status.HELD}


def settlement(event: NewEvent | WebhookEvent, outcome: ProcessingOutcome,
               now: datetime) -> dict[str, Any]:
    """The event's fields once ``outcome`` is settled, in the processing transaction."""
    fields: dict[str, Any] = {"status_reason": outcome.reason, "claimed_by": ""}
    if outcome.kind == Outcome.RETRY:
        fields.update(_failed_attempt(event, outcome.reason, now))
    else:
        fields.update(status=STATUS_AFTER[outcome.kind], next_attempt_at=None, processed_at=now)
        if event.status in WebhookEvent.PENDING:  # its first settlement, not a replay's
            metrics.settled_after((now - event.received_at).total_seconds())
    return fields


def event_settle(event: WebhookEvent, outcome: ProcessingOutcome) -> str:
    """Save a stored event's settlement (the event row is locked); its new status."""
    _save(event, settlement(event, outcome, timezone.now()))
    return event.status


def _save(event: WebhookEvent, fields: dict[str, Any]) -> None:
    """Write ``fields`` to the (locked) event row, and to ``event``."""
    for field, value in fields.items():
        setattr(event, field, value)
    event.save(update_fields=list(fields))


def event_postpone(event_id: int, reason: str, *, counted: bool) -> ProcessingOutcome:
    """Busy, not broken: try again soon. ``counted``: this attempt was counted against
    WEBHOOK_MAX_ATTEMPTS (inline and worker attempts are, replays are not); it is
    given back, so contention alone never makes an event dead."""
    delay = timedelta(seconds=random.uniform(0.5, 2.0))
    with transaction.atomic():
        event = WebhookEvent.objects.select_for_update().get(pk=event_id)
        if event.status in WebhookEvent.PENDING:
            event.next_attempt_at = timezone.now() + delay
            event.claimed_by = ""
            if counted and event.attempts > 0:
                event.attempts -= 1
            event.save(update_fields=["next_attempt_at", "attempts", "claimed_by"])
    return ProcessingOutcome(Outcome.RETRY, reason, status_after=event.status)


def event_fail(event_id: int, error: str) -> ProcessingOutcome:
    """The processor raised: schedule a retry with backoff, or give up (dead)."""
    with transaction.atomic():
        event = WebhookEvent.objects.select_for_update().get(pk=event_id)
        fields: dict[str, Any] = {"last_error": error}
        if event.status in WebhookEvent.PENDING:
            fields.update(_failed_attempt(event, error, timezone.now()), claimed_by="")
        _save(event, fields)
    return ProcessingOutcome(Outcome.FAILED, error, status_after=event.status)


def attempt_record(event_id: int, trigger: str, started_at: datetime,
                   outcome: ProcessingOutcome, error: str = "", tb: str = "", *,
                   worker: str = "", requested_by: AbstractBaseUser | None = None) -> None:
    """Keep one processing attempt on the event's timeline (after its transaction)."""
    WebhookEventAttempt.objects.create(
        event_id=event_id, trigger=trigger, worker=worker, started_at=started_at,
        finished_at=timezone.now(), outcome=outcome.kind, reason=outcome.reason,
        error=error, traceback=tb, status_after=outcome.status_after,
        requested_by=requested_by if requested_by is not None and requested_by.pk else None,
    )


class CannotDismiss(Exception):
    """Only a held event can be dismissed, and only with a written reason."""


def event_dismiss(*, event_id: int, requested_by: AbstractBaseUser,
                  reason: str) -> ProcessingOutcome:
    """Staff decided a held event is not to be applied: it becomes ``skipped``, and the
    timeline keeps who decided and why. Nothing in the ledger changes."""
    reason = reason.strip()
    if not reason:
        raise CannotDismiss("Say why the event is dismissed.")
    started_at = timezone.now()
    with transaction.atomic():
        event = WebhookEvent.objects.select_for_update().get(pk=event_id)
        if event.status != Status.HELD:
            raise CannotDismiss(f"{event.stripe_event_id} is {event.status}, not held: only "
                                "held events are dismissed.")
        who = requested_by.get_username()
        outcome = ProcessingOutcome(Outcome.SKIPPED, f"dismissed by {who}: {reason}",
                                    status_after=Status.SKIPPED)
        event_settle(event, outcome)
        attempt_record(event.pk, Trigger.DISMISS, started_at, outcome,
                       requested_by=requested_by)
        payout = audit.payout_of(event)
        audit.record(audit.Action.DISMISS, actor=requested_by, target=event.stripe_event_id,
                     outcome=Status.SKIPPED, detail=reason, event=event, payout=payout,
                     before=audit.payout_state(payout))
    log.info("webhook.dismissed", event_pk=event_id, user=who, reason=reason)
    return outcome


# --- the workers' queue --------------------------------------------------------------------

# Due events, in order, skipping rows another worker has locked; each is leased to the
# worker (``next_attempt_at`` moves a lease ahead) and counted as an attempt.
CLAIM_SQL = f"""
WITH due AS (
    SELECT id FROM {EVENT}
    WHERE status IN ('received', 'failed') AND next_attempt_at <= now() AND claimed_by = ''
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {EVENT} AS event
SET attempts = event.attempts + 1,
    next_attempt_at = now() + make_interval(secs => %(lease)s),
    claimed_by = %(worker)s
FROM due WHERE event.id = due.id
RETURNING event.id
"""

# Claimed events whose lease ran out before their attempt settled: the worker died.
ABANDONED_SQL = f"""
SELECT id FROM {EVENT}
WHERE status IN ('received', 'failed') AND next_attempt_at <= now() AND claimed_by <> ''
ORDER BY next_attempt_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""


def claim_due(*, worker: str, limit: int) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(CLAIM_SQL, {"limit": limit, "lease": settings.WEBHOOK_LEASE_SECONDS,
                                   "worker": worker[:128]})
        return [row[0] for row in cursor.fetchall()]


def _abandoned(limit: int) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(ABANDONED_SQL, {"limit": limit})
        return [row[0] for row in cursor.fetchall()]


def settle_abandoned(*, limit: int = 100) -> int:
    """Attempts whose worker stopped before finishing them count as failed attempts: each
    is put on the event's timeline, and the event is retried or given up by the policy."""
    if not _abandoned(limit):  # the usual answer, in one round trip before every claim
        return 0
    now = timezone.now()
    with transaction.atomic():
        ids = _abandoned(limit)  # again, locked now until the transaction ends
        for event in WebhookEvent.objects.filter(pk__in=ids).defer("raw_body", "headers"):
            error = (f"attempt {event.attempts} by {event.claimed_by} stopped before it "
                     "finished (its lease ran out)")
            _save(event, {**_failed_attempt(event, error, now), "claimed_by": ""})
            attempt_record(event.pk, Trigger.ABANDONED, now, ProcessingOutcome(
                Outcome.FAILED, error, status_after=event.status), error=error)
    if ids:
        log.warning("worker.attempts_abandoned", count=len(ids))
    return len(ids)
