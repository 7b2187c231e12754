"""Stripe as the source of truth: what the webhooks missed, read back from Stripe's API.

Webhooks are the fast path; Stripe's API is the record:

* ``sync_events`` lists the ``payout.*`` events of the last days (the Events API
  keeps 30) for the platform and every seller's connected account, and feeds each
  one we have not stored through the inbox like a delivery (source ``events_api``);
* ``reconcile`` compares payouts with ``GET /v1/payouts/{id}``; with ``apply``, each
  drifted payout takes Stripe's state through the processor as a *resync* event:
  the payout as Stripe returned it, stored in the inbox (so it is on the payout's
  timeline, with who or what asked) and checked by the ledger's rules like any event;
* ``payout_fetch`` does the same for a payout an event names that we do not know.

Only reads go to Stripe (``StripeReader``): nothing here calls a write endpoint.
"""

from __future__ import annotations

import json
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from django.db.models import Q, QuerySet
from django.utils import timezone

from payouts import stripe_events, transitions
from payouts.models import JobRun, Payout, Seller, WebhookEvent
from payouts.services import inbox, ledger, processing
from payouts.services.outcome import Outcome, ProcessingOutcome
from payouts.stripe_api import (
    Answer,
    StripeMissing,
    StripeReader,
    StripeRefused,
    StripeUnavailable,
    stripe_client,
)

log = structlog.get_logger(__name__)

SYNC_MAX_DAYS = WebhookEvent.KEPT_BY_STRIPE.days  # the Events API's window
CHANGED_RECENTLY = timedelta(days=7)  # reconcile also checks payouts changed since
# Requests in a row that Stripe could not answer (retries ran out): stop the run.
GIVE_UP_AFTER_UNAVAILABLE = 3
# reconcile lists an account's payouts (100 a request) when at least LIST_FROM of those it
# checks were made in the last LIST_DAYS; a payout may be at Stripe a little before our row.
LIST_FROM = 3
LIST_DAYS = 8
LIST_MARGIN = timedelta(days=1)
# Fetching a payout an event names: a worker, or a person's replay, waits on it.
FETCH_TIMEOUT_S = 5.0
# The event a resync is stored as: the type Stripe sends for the payout's status.
RESYNC_TYPE = {status: event_type for event_type, status in transitions.STATUS_OF_TYPE.items()}
Tick = Callable[[str], None]  # told what is going on: for progress and the job's lease


def quiet(message: str) -> None:
    pass


# --- resync events -------------------------------------------------------------------------


def resync_event(answer: Answer, *, account: str, known: bool,
                 event_id: str = "") -> dict[str, Any]:
    """Stripe's payout (``answer`` of ``GET /v1/payouts/{id}``) as an event for the
    processor: ``payout.created`` for a payout we do not know, else the type Stripe
    sends for its status.

    Its ``created`` is one second before Stripe's ``Date`` of the answer (Stripe's
    clock): every event made after the read is newer and applies; one made in the
    same second before the read may apply after it too, but only moves the payout
    forward (the transition table refuses going back)."""
    payout_object = answer.data
    status = str(payout_object.get("status") or "")
    return {
        "id": event_id or f"resync_{secrets.token_hex(12)}",
        "object": "event",
        "type": RESYNC_TYPE.get(status, "payout.updated") if known else "payout.created",
        "created": int(answer.stripe_time.timestamp()) - 1,
        "livemode": bool(payout_object.get("livemode", False)),
        "api_version": None,
        "account": account or None,
        "data": {"object": payout_object},
        "request": {"id": answer.request_id or None, "idempotency_key": None},
    }


def _resync_store(event: dict[str, Any], answer: Answer,
                  origin: inbox.Origin) -> ProcessingOutcome:
    """Store a resync event and process it now. A resync stored before under the same id
    (a payout fetched before) is not stored again: its status is the outcome."""
    received = processing.event_receive(event, json.dumps(event).encode(),
                                        {"request-id": answer.request_id}, origin=origin,
                                        nowait=False)
    if received.outcome is not None:
        return received.outcome
    stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
    kind = Outcome.APPLIED if stored.status == WebhookEvent.Status.PROCESSED else Outcome.RETRY
    return ProcessingOutcome(kind, f"{stored.stripe_event_id} is {stored.status}: "
                                   f"{stored.status_reason}", status_after=stored.status)


def payout_fetch(stripe_payout_id: str, *, account: str,
                 origin: inbox.Origin) -> tuple[str, ProcessingOutcome]:
    """A payout an event names that we do not know: fetch it from Stripe and create it
    (a resync ``payout.created``, one per payout however often it is asked for). One
    short try: the caller waits. Raises ``StripeMissing`` when Stripe lacks it too."""
    reader = StripeReader(stripe_client(timeout_s=FETCH_TIMEOUT_S), attempts=1)
    answer = reader.get(f"/v1/payouts/{stripe_payout_id}", account=account)
    event = resync_event(answer, account=account, known=False,
                         event_id=stripe_events.derived_id("resync", "created", stripe_payout_id))
    outcome = _resync_store(event, answer, origin)
    log.info("stripe.payout_fetched", payout=stripe_payout_id, account=account or None,
             resync_event=event["id"], outcome=outcome.kind)
    return event["id"], outcome


# --- sync_events ---------------------------------------------------------------------------


@dataclass
class AccountSync:
    """What one account's listing gave."""

    account: str  # "" for the platform
    listed: int = 0
    new: int = 0  # stored by this run
    applied: int = 0
    held: int = 0
    waiting: int = 0  # stored, to be retried (its seller is not known yet, an error)
    unchanged: int = 0  # skipped or ignored: nothing to change
    malformed: int = 0  # not an event we can store (logged)
    error: str = ""  # why Stripe did not list the account's events


@dataclass
class SyncResult:
    """A run's counts per account, filled in as it goes."""

    accounts: list[AccountSync] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        keys = [k for k in asdict(AccountSync("")) if k not in ("account", "error")]
        return {"accounts": len(self.accounts),
                **{k: sum(getattr(a, k) for a in self.accounts) for k in keys},
                "errors": sum(bool(a.error) for a in self.accounts)}

    def findings(self) -> list[dict[str, Any]]:
        return [asdict(a) for a in self.accounts if a.listed or a.error]

    def problems(self) -> str:
        """Accounts Stripe would not list: their missed events cannot be known."""
        return "; ".join(a.error for a in self.accounts if a.error)

    def status(self) -> str:
        return JobRun.Status.FAILED if self.problems() else JobRun.Status.OK


TALLY = {Outcome.APPLIED: "applied", Outcome.HELD: "held", Outcome.SKIPPED: "unchanged",
         Outcome.IGNORED: "unchanged", Outcome.RETRY: "waiting", Outcome.FAILED: "waiting"}


def sync_events(*, days: int, origin: inbox.Origin, reader: StripeReader | None = None,
                tick: Tick = quiet, result: SyncResult | None = None) -> SyncResult:
    """List the ``payout.*`` events of the last ``days`` for the platform and every
    seller, and process each one we have not stored, oldest first. Safe to run twice,
    or twice at once: an event is stored once (its id is unique). ``result`` collects
    the counts as they come (the caller keeps them if the run stops early)."""
    if not 1 <= days <= SYNC_MAX_DAYS:
        raise ValueError(f"days must be 1 to {SYNC_MAX_DAYS}: Stripe keeps events "
                         f"{SYNC_MAX_DAYS} days")
    reader = reader or StripeReader()
    since = int((timezone.now() - timedelta(days=days)).timestamp())
    accounts = ["", *Seller.objects.order_by("id").values_list("stripe_account_id", flat=True)]
    result = result if result is not None else SyncResult()
    unavailable = 0
    for number, account in enumerate(accounts, 1):
        try:
            counts = _sync_account(account, since, reader, origin, tick)
            unavailable = 0
        except (StripeRefused, StripeUnavailable) as exc:  # e.g. 403: access revoked
            counts = AccountSync(account, error=str(exc))
            unavailable = unavailable + 1 if isinstance(exc, StripeUnavailable) else 0
            if unavailable >= GIVE_UP_AFTER_UNAVAILABLE:
                raise
        result.accounts.append(counts)
        totals = result.counts()
        tick(f"[{number}/{len(accounts)} accounts] listed {totals['listed']}, "
             f"new {totals['new']}, applied {totals['applied']}, held {totals['held']}")
    log.info("stripe.events_synced", days=days, **result.counts())
    return result


def _sync_account(account: str, since: int, reader: StripeReader, origin: inbox.Origin,
                  tick: Tick) -> AccountSync:
    counts = AccountSync(account)
    listed = list(reader.list_all("/v1/events", {"type": "payout.*", "created": {"gte": since}},
                                  account=account))
    counts.listed = len(listed)
    stored = _stored([event.get("id") for event, _ in listed])
    for event, page in reversed(listed):  # Stripe lists newest first: apply oldest first
        if event.get("id") in stored:
            continue
        problem = inbox.event_shape_problem(event)
        if problem:
            counts.malformed += 1
            log.warning("stripe.event_malformed", account=account or None,
                        event=str(event.get("id"))[:80], problem=problem)
            continue
        if account and event.get("account") not in (None, account):
            log.warning("stripe.event_account_differs", listed_under=account,
                        event=event["id"], account_in_body=event.get("account"))
        # Listed under the account's Stripe-Account: it is that account's event, whatever
        # its body says. The body is kept exactly as Stripe listed it.
        payload = {**event, "account": account} if account else event
        received = processing.event_receive(
            payload, json.dumps(event).encode(),
            {"stripe-account": account, "request-id": page.request_id}, origin=origin,
            nowait=False)
        if received.duplicate:  # a delivery or another run stored it meanwhile
            continue
        assert received.event_id is not None and received.outcome is not None
        counts.new += 1
        outcome = received.outcome
        if outcome.missing_payout:  # fetched from Stripe now, not at the next retry
            outcome = processing.event_process(event_id=received.event_id,
                                               trigger=processing.Trigger.WORKER,
                                               worker="sync_events")
        setattr(counts, TALLY[outcome.kind], getattr(counts, TALLY[outcome.kind]) + 1)
        tick(f"{account or 'platform'}: {counts.new} of {counts.listed} events stored")
    return counts


def _stored(event_ids: list[Any]) -> set[str]:
    ids = [i for i in event_ids if isinstance(i, str)]
    found: set[str] = set()
    for start in range(0, len(ids), 1000):
        found.update(WebhookEvent.objects.filter(stripe_event_id__in=ids[start:start + 1000])
                     .values_list("stripe_event_id", flat=True))
    return found


# --- reconcile_payouts ---------------------------------------------------------------------


def payouts_to_reconcile() -> QuerySet[Payout]:
    """Payouts Stripe may see otherwise: not final yet (pending, in transit, stuck past
    arrival), marked for review (ties, refusals) or changed in the last 7 days."""
    recently = timezone.now() - CHANGED_RECENTLY
    return (Payout.objects.filter(stripe_payout_id__isnull=False)
            .filter(Q(status__in=[Payout.Status.PENDING, Payout.Status.IN_TRANSIT])
                    | ~Q(review_reason="") | Q(updated_at__gte=recently))
            .select_related("seller").order_by("id"))


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _shown(name: str, value: Any) -> str:
    if value is None or value == "":
        return "none"
    if name == "arrival_date" and isinstance(value, int):
        return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


def _compared(stripe_payout: dict[str, Any]) -> dict[str, Any]:
    """What reconcile compares of a Stripe payout."""
    currency = stripe_payout.get("currency")
    return {"status": stripe_payout.get("status"), "amount": stripe_payout.get("amount"),
            "currency": currency.lower() if isinstance(currency, str) else currency,
            "arrival_date": stripe_payout.get("arrival_date"),
            "failure_code": stripe_payout.get("failure_code") or None}


def differences(payout: Payout, stripe_payout: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each compared field where our payout differs from Stripe's: (ours, Stripe's)."""
    ours = {"status": payout.status, "amount": payout.amount,
            "currency": payout.currency.lower(), "arrival_date": _unix(payout.arrival_date),
            "failure_code": payout.failure_code or None}
    theirs = _compared(stripe_payout)
    return {name: (_shown(name, ours[name]), _shown(name, theirs[name]))
            for name in ours if ours[name] != theirs[name]}


@dataclass
class Drift:
    """A payout that differs from Stripe's, or that Stripe does not know."""

    payout_id: int
    stripe_payout_id: str
    account: str
    fields: dict[str, tuple[str, str]] = field(default_factory=dict)
    missing: bool = False  # Stripe answered 404
    applied: str = ""  # with --apply: what the processor did ("applied", "held: …")
    event: str = ""  # with --apply: the resync event's id

    def line(self) -> str:
        if self.missing:
            what = "missing at Stripe (404); kept, marked for review" if self.applied else \
                "missing at Stripe (404)"
        else:
            what = "; ".join(f"{name}: ours {ours}, Stripe {stripe}"
                             for name, (ours, stripe) in self.fields.items())
        done = f"  -> {self.applied}" if self.applied and not self.missing else ""
        return f"{self.stripe_payout_id} ({self.account or 'platform'}): {what}{done}"


@dataclass
class ReconcileResult:
    """A run's findings, filled in as it goes."""

    checked: int = 0
    drifts: list[Drift] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # payouts Stripe could not answer for

    def counts(self) -> dict[str, int]:
        applied = [d for d in self.drifts if d.applied.startswith(Outcome.APPLIED)]
        return {"checked": self.checked, "drifted": sum(not d.missing for d in self.drifts),
                "missing": sum(d.missing for d in self.drifts), "applied": len(applied),
                "not_applied": sum(bool(d.applied) and not d.missing for d in self.drifts)
                - len(applied), "errors": len(self.errors)}

    def findings(self) -> list[dict[str, Any]]:
        return [{**asdict(d), "fields": {k: list(v) for k, v in d.fields.items()}}
                for d in self.drifts]

    def problems(self) -> str:
        """Payouts Stripe could not answer for: "nothing drifted" cannot be said."""
        return "; ".join(self.errors)

    def status(self) -> str:
        if self.drifts:
            return JobRun.Status.DRIFTED
        return JobRun.Status.FAILED if self.errors else JobRun.Status.OK


def reconcile(payouts: Iterable[Payout], *, apply: bool, origin: inbox.Origin,
              reader: StripeReader | None = None, tick: Tick = quiet,
              result: ReconcileResult | None = None) -> ReconcileResult:
    """Compare each payout with Stripe's (status, amount, currency, arrival date, failure
    code). With ``apply``, bring each drifted one to Stripe's state through the processor;
    one it does not apply (held: amount or currency differ; skipped: against the rules)
    is marked for review, as is a payout Stripe does not know. Nothing is deleted.

    An account's recent payouts are read by listing them (100 a request), the others
    one by one (``GET /v1/payouts/{id}``). ``result`` collects what is found as it comes
    (the caller keeps it if the run stops early)."""
    reader = reader or StripeReader()
    result = result if result is not None else ReconcileResult()
    by_account: dict[str, list[Payout]] = defaultdict(list)
    for payout in payouts:
        by_account[payout.seller.stripe_account_id if payout.seller else ""].append(payout)
    unavailable = 0
    for account, group in by_account.items():
        listed = _recent_payouts(account, group, reader)
        for payout in group:
            assert payout.stripe_payout_id is not None
            drift = Drift(payout.pk, payout.stripe_payout_id, account)
            try:
                answer = listed.get(payout.stripe_payout_id) or reader.get(
                    f"/v1/payouts/{payout.stripe_payout_id}", account=account)
            except StripeMissing:
                drift.missing = True
                answer = None
            except (StripeRefused, StripeUnavailable) as exc:  # e.g. 403: access revoked
                result.errors.append(f"{payout.stripe_payout_id}: {exc}")
                unavailable = unavailable + 1 if isinstance(exc, StripeUnavailable) else 0
                if unavailable >= GIVE_UP_AFTER_UNAVAILABLE:
                    raise
                continue
            unavailable = 0
            result.checked += 1
            if answer is not None and differences(payout, answer.data):
                payout.refresh_from_db()  # a webhook may have moved it since the run began
                drift.fields = differences(payout, answer.data)
            if drift.missing or drift.fields:
                if apply:
                    _bring_to_stripe(drift, answer, origin)
                result.drifts.append(drift)
                log.warning("stripe.payout_drifted", payout=drift.stripe_payout_id,
                            missing=drift.missing, fields=drift.fields, applied=drift.applied)
            tick(f"checked {result.checked}, drifted {len(result.drifts)}")
    return result


def _recent_payouts(account: str, payouts: list[Payout],
                    reader: StripeReader) -> dict[str, Answer]:
    """Stripe's payouts on ``account`` made since the oldest of ``payouts`` (at most
    LIST_DAYS back), when enough of them are recent to make a list cheaper than one
    request each; by id. Empty when the list fails: each is then read on its own."""
    since = max(min(p.created_at for p in payouts) - LIST_MARGIN,
                timezone.now() - timedelta(days=LIST_DAYS))
    if sum(p.created_at >= since for p in payouts) < LIST_FROM:
        return {}
    wanted = {p.stripe_payout_id for p in payouts}
    found: dict[str, Answer] = {}
    try:
        for obj, page in reader.list_all("/v1/payouts",
                                         {"created": {"gte": int(since.timestamp())}},
                                         account=account):
            if obj.get("id") in wanted:
                found[obj["id"]] = Answer(obj, page.request_id, page.stripe_time)
            if len(found) == len(wanted):
                break
    except (StripeRefused, StripeUnavailable) as exc:
        log.warning("stripe.payouts_not_listed", account=account or None, error=str(exc))
        return {}
    return found


def _bring_to_stripe(drift: Drift, answer: Answer | None, origin: inbox.Origin) -> None:
    if answer is None:
        ledger.flag_for_review(drift.payout_id, f"reconcile: Stripe does not know "
                                                f"{drift.stripe_payout_id} (404); check it")
        drift.applied = "marked for review"
        return
    before = _unapplied_resync(drift.stripe_payout_id, answer.data)
    if before is not None:  # a person has it already: no new event every run
        drift.event = before.stripe_event_id
        drift.applied = (f"not sent again: {before.stripe_event_id} carried the same state "
                         f"and is {before.status}")
        return
    event = resync_event(answer, account=drift.account, known=True)
    outcome = _resync_store(event, answer, origin)
    drift.event = event["id"]
    drift.applied = f"{outcome.kind}: {outcome.reason}" if outcome.reason else outcome.kind
    # Skipped because a newer event moved the payout since the read: nothing to look at.
    if outcome.kind == Outcome.HELD or (
            outcome.kind == Outcome.SKIPPED and not _moved_since(drift.payout_id,
                                                                  event["created"])):
        fields = ", ".join(f"{name} {stripe}" for name, (_, stripe) in drift.fields.items())
        ledger.flag_for_review(drift.payout_id, f"reconcile: Stripe has {fields}, not "
                                                f"applied ({outcome.kind}: {outcome.reason})")


def _unapplied_resync(stripe_payout_id: str,
                      stripe_payout: dict[str, Any]) -> WebhookEvent | None:
    """The payout's newest resync, when it was held or skipped and carried the state
    Stripe has now."""
    last = (WebhookEvent.objects.filter(stripe_object_id=stripe_payout_id,
                                        source=WebhookEvent.Source.RESYNC)
            .order_by("-stripe_created", "-id").first())
    if last is None or last.status not in (WebhookEvent.Status.HELD,
                                            WebhookEvent.Status.SKIPPED):
        return None
    carried = json.loads(bytes(last.raw_body))["data"]["object"]
    return last if _compared(carried) == _compared(stripe_payout) else None


def _moved_since(payout_id: int, created: int) -> bool:
    """Whether an event newer than ``created`` (Unix seconds) was applied to the payout."""
    last = Payout.objects.values_list("last_event_created", flat=True).get(pk=payout_id)
    return last is not None and last > datetime.fromtimestamp(created, tz=UTC)
