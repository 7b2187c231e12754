"""Deterministic demo data, run through the real processor; safe to run again.

Sellers with released transactions, payouts created the way `create_payouts`
creates them, then their Stripe events recorded and processed like deliveries:
payouts end up in every status, with timelines, attempts and transaction logs.
A few events fail for real (unknown payout) or are made to look like a past
failure (so staff can replay them), and one is dead. The ledger's rules show too:
events held because they disagree with our payout, a paid payout reversed, and
two events in the same second that mark a payout for reconciliation. So does
Stripe as the source of truth: an event recovered by sync_events, a payout brought
to Stripe's state by reconcile_payouts, one missing at Stripe, with their runs.
"""

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group, Permission, User
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from payouts import stripe_events
from payouts.models import (
    JobRun,
    PaymentTransaction,
    PaymentTransfer,
    Payout,
    PayoutItem,
    Seller,
    WebhookEvent,
    WebhookEventAttempt,
)
from payouts.roles import ensure_roles
from payouts.services import inbox, ledger, stripe_sync
from payouts.services.processing import event_process, event_receive
from payouts.stripe_api import Answer

DAY = 86400

# Demo logins for a local console; `make run` prints them.
DEMO_USERS = [
    # username, password, role (a group, or superuser)
    ("support", "support-demo-password", "Support"),
    ("manager", "manager-demo-password", "Managers"),
    ("admin", "admin-demo-password", "superuser"),
]

SELLERS = [
    ("Atelier Nord", "acct_1DemoAtelierNord00"),
    ("Blue Heron Books", "acct_1DemoBlueHeron0000"),
    ("Cedar & Clay", "acct_1DemoCedarClay0000"),
    ("Dune Coffee Roasters", "acct_1DemoDuneCoffee000"),
    ("Elm Street Prints", "acct_1DemoElmStreet0000"),
    ("Fjord Outdoor", "acct_1DemoFjordOutdoor0"),
]
FAILURE_CODES = ["account_closed", "insufficient_funds", "no_account",
                 "invalid_account_number", "could_not_process", "bank_account_restricted"]
FAILURE_MESSAGES = {
    "account_closed": "The bank account has been closed.",
    "insufficient_funds": "Your Stripe account has insufficient funds to cover the payout.",
    "no_account": "The bank account details on file are probably incorrect.",
    "invalid_account_number": "The routing number is correct, the account number is invalid.",
    "could_not_process": "The bank could not process this payout.",
    "bank_account_restricted": "The bank account has restrictions on payouts.",
}
# Each seller's payouts: (final status, days ago it was created).
SCENARIO = [("paid", 40), ("paid", 26), ("paid", 12), ("failed", 9), ("in_transit", 6),
            ("in_transit", 1), ("pending", 0), ("canceled", 3)]


class Command(BaseCommand):
    help = "Load the deterministic demo data and demo logins (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        self.base = datetime.combine(date.today(), time(), tzinfo=UTC)  # midnight UTC today
        with transaction.atomic():
            ensure_roles(Group, Permission)
            for username, password, role in DEMO_USERS:
                user, _ = User.objects.get_or_create(username=username)
                user.is_staff = user.is_superuser = role == "superuser"
                user.set_password(password)
                user.save()
                if role != "superuser":
                    user.groups.set([Group.objects.get(name=role)])
        processed = 0
        for s, (name, account) in enumerate(SELLERS):
            seller, _ = Seller.objects.get_or_create(stripe_account_id=account,
                                                     defaults={"name": name})
            self._unpaid_transactions(seller, s)
            for p, (final_status, days_ago) in enumerate(SCENARIO):
                processed += self._payout(seller, s, p, final_status, days_ago)
        processed += self._troubled_events()
        self.stdout.write(f"Demo data ready ({processed} new events processed).")
        self.stdout.write("Demo logins (local demo only):")
        for username, password, role in DEMO_USERS:
            self.stdout.write(f"  {username} / {password}  ({role})")

    def _ts(self, days_ago: float) -> int:
        return int((self.base - timedelta(days=days_ago)).timestamp())

    def _unpaid_transactions(self, seller: Seller, s: int) -> None:
        if seller.transactions.filter(payed_out=False).exists():
            return
        for k in range(3):
            PaymentTransaction.objects.create(
                seller=seller, amount=2500 + 310 * k + 45 * s, currency="usd",
                release_date=(self.base - timedelta(days=k)).date())

    @transaction.atomic
    def _payout_rows(self, seller: Seller, s: int, p: int, days_ago: int) -> Payout:
        """The payout as `create_payouts` leaves it: transactions paid out, transfers pending."""
        payout_id = f"po_1Demo{s:02d}{p:02d}{seller.stripe_account_id[-6:]}"
        existing = Payout.objects.filter(stripe_payout_id=payout_id).first()
        if existing is not None:
            return existing
        released_at = self.base - timedelta(days=days_ago)
        amounts = [1200 + 250 * ((s + p + k) % 7) for k in range(3)]
        payout = Payout.objects.create(
            seller=seller, stripe_payout_id=payout_id, amount=sum(amounts), currency="usd",
            status="pending", metadata={"payout_console_id": f"demo-{s}-{p}"})
        Payout.objects.filter(pk=payout.pk).update(created_at=released_at)  # as if made then
        for k, amount in enumerate(amounts):
            txn = PaymentTransaction.objects.create(
                seller=seller, amount=amount, currency="usd",
                release_date=(released_at - timedelta(days=3)).date(),
                payed_out=True, actual_release_date=released_at)
            transfer = PaymentTransfer.objects.create(
                payment_transaction=txn, amount=amount,
                stripe_transfer_id=f"tr_1Demo{s:02d}{p:02d}{k:02d}")
            PayoutItem.objects.create(payout=payout, payment_transfer=transfer)
        return payout

    def _payout(self, seller: Seller, s: int, p: int, final_status: str, days_ago: int) -> int:
        payout = self._payout_rows(seller, s, p, days_ago)
        created = self._ts(days_ago)
        arrival = created + 2 * DAY
        steps: list[tuple[str, str, dict[str, Any]]] = [("payout.created", "pending", {})]
        if final_status in ("in_transit", "paid", "failed"):
            steps.append(("payout.updated", "in_transit", {}))
        if final_status in ("paid", "failed"):
            steps.append(("payout.paid", "paid", {}))
        if final_status == "failed":
            code = FAILURE_CODES[s % len(FAILURE_CODES)]
            steps.append(("payout.failed", "failed",
                          {"failure_code": code, "failure_message": FAILURE_MESSAGES[code]}))
        if final_status == "canceled":
            steps.append(("payout.canceled", "canceled", {}))
        if s == 0 and p == 4:  # a payout stuck in transit: its arrival date has passed
            arrival = created + DAY
        processed = 0
        for n, (event_type, status, extra) in enumerate(steps):
            obj = stripe_events.payout_object(
                payout.stripe_payout_id, status=status, amount=payout.amount, created=created,
                arrival_date=arrival, metadata=payout.metadata, **extra)
            event = stripe_events.payout_event(
                event_type, obj, account=seller.stripe_account_id,
                created=created + n * 3600 * 6, event_id=f"evt_1Demo{s:02d}{p:02d}{n:02d}")
            processed += self._deliver(event)
        if final_status == "paid" and p == 0:
            # A late, older payout.updated: skipped, the payout stays paid.
            obj = stripe_events.payout_object(payout.stripe_payout_id, status="in_transit",
                                              amount=payout.amount, created=created)
            late = stripe_events.payout_event("payout.updated", obj, created=created + 3600,
                                              account=seller.stripe_account_id,
                                              event_id=f"evt_1Demo{s:02d}{p:02d}late")
            processed += self._deliver(late)
        return processed

    def _deliver(self, event: dict[str, Any], *, process: bool = True) -> int:
        """Record like the webhook endpoint does, then process inline. 1 if new."""
        body = stripe_events.encode(event)
        headers = {"content-type": "application/json; charset=utf-8",
                   "user-agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"}
        if process:
            return 0 if event_receive(event, body, headers).duplicate else 1
        return 0 if inbox.event_record(event, body, headers, lease_s=0).duplicate else 1

    def _troubled_events(self) -> int:
        """Failed, dead and ignored events for the console's failure views."""
        account = SELLERS[1][1]
        count = 0
        # Waits for a payout nobody knows yet: failed, retried with backoff, then dead.
        unknown = stripe_events.payout_object("po_1DemoUnknownPayout01", status="paid",
                                              created=self._ts(0.5))
        count += self._deliver(stripe_events.payout_event(
            "payout.paid", unknown, account=account, created=self._ts(0.5),
            event_id="evt_1DemoUnknownPaid01"))
        # The same wait, with its attempts used up long ago: dead.
        gone = stripe_events.payout_object("po_1DemoVanishedPayout", status="failed",
                                           created=self._ts(4),
                                           **stripe_events.failed_payout_defaults())
        event = stripe_events.payout_event("payout.failed", gone, account=account,
                                           created=self._ts(4), event_id="evt_1DemoDeadFailed01")
        if self._deliver(event, process=False):
            WebhookEvent.objects.filter(stripe_event_id=event["id"]).update(
                attempts=settings.WEBHOOK_MAX_ATTEMPTS,
                received_at=timezone.now() - timedelta(days=4))
            event_process(event_id=WebhookEvent.objects.get(stripe_event_id=event["id"]).pk,
                          trigger=WebhookEventAttempt.Trigger.WORKER, worker="seed_demo")
            count += 1
        # Not handled: stored and ignored.
        obj = stripe_events.payout_object(f"po_1Demo0000{SELLERS[0][1][-6:]}", status="paid")
        count += self._deliver(stripe_events.payout_event(
            "payout.reconciliation_completed", obj, account=SELLERS[0][1],
            created=self._ts(30), event_id="evt_1DemoReconciled01"))
        count += self._past_failure()
        count += self._ledger_rules()
        count += self._stripe_truth()
        return count

    def _stripe_truth(self) -> int:
        """What the workers' scheduled jobs find when Stripe knows more than the webhooks
        told us: a missed payout.paid listed by sync_events, a payout Stripe failed
        without an event reaching us (reconcile_payouts --apply), and one Stripe lacks."""
        if JobRun.objects.exists():
            return 0
        count = 0
        # sync_events: Blue Heron's payout.paid never arrived; the Events API had it.
        missed = self._demo_payout(1, 4)
        account = SELLERS[1][1]
        obj = stripe_events.payout_object(missed.stripe_payout_id, status="paid",
                                          amount=missed.amount, created=self._ts(6))
        event = stripe_events.payout_event("payout.paid", obj, account=account,
                                           created=self._ts(3), event_id="evt_1DemoSynced01")
        scheduled = "sync_events (scheduled)"
        count += 0 if event_receive(event, json.dumps(event).encode(),
                                    {"stripe-account": account, "request-id": "req_1DemoSync"},
                                    origin=inbox.Origin(WebhookEvent.Source.EVENTS_API,
                                                        scheduled)).duplicate else 1
        started = timezone.now() - timedelta(minutes=9)
        counts = {"accounts": len(SELLERS) + 1, "listed": 61, "new": 1, "applied": 1,
                  "held": 0, "waiting": 0, "unchanged": 0, "malformed": 0, "errors": 0}
        JobRun.objects.create(
            job=JobRun.Job.SYNC_EVENTS, trigger=JobRun.Trigger.SCHEDULE, runner="demo:1",
            scope="--days 3", apply=True, started_at=started,
            finished_at=started + timedelta(seconds=4), status=JobRun.Status.OK, counts=counts,
            findings=[vars(stripe_sync.AccountSync(account, listed=8, new=1, applied=1))])
        # reconcile_payouts --apply: Fjord's payout failed at Stripe, silently for us; Elm
        # Street's is unknown to Stripe (kept, marked for review).
        failed, vanished = self._demo_payout(5, 5), self._demo_payout(4, 5)
        started = timezone.now() - timedelta(minutes=4)
        obj = stripe_events.payout_object(
            failed.stripe_payout_id, status="failed", amount=failed.amount, created=self._ts(1),
            arrival_date=int(failed.arrival_date.timestamp()) if failed.arrival_date else None,
            failure_code="could_not_process",
            failure_message=FAILURE_MESSAGES["could_not_process"])
        event = stripe_sync.resync_event(Answer(obj, "req_1DemoReconcile", started),
                                         account=SELLERS[5][1], known=True)
        event["id"] = "resync_1DemoReconcile01"
        drift = stripe_sync.Drift(failed.pk, failed.stripe_payout_id or "", SELLERS[5][1],
                                  fields={"status": ("in_transit", "failed"),
                                          "failure_code": ("none", "could_not_process")})
        received = event_receive(event, json.dumps(event).encode(),
                                 {"request-id": "req_1DemoReconcile"},
                                 origin=inbox.Origin(WebhookEvent.Source.RESYNC,
                                                     "reconcile_payouts --apply (scheduled)"))
        count += 0 if received.duplicate else 1
        assert received.outcome is not None
        drift.applied, drift.event = f"applied: {received.outcome.reason}", event["id"]
        ledger.flag_for_review(vanished.pk, f"reconcile: Stripe does not know "
                                            f"{vanished.stripe_payout_id} (404); check it")
        missing = stripe_sync.Drift(vanished.pk, vanished.stripe_payout_id or "", SELLERS[4][1],
                                    missing=True, applied="marked for review")
        result = stripe_sync.ReconcileResult(checked=19, drifts=[drift, missing])
        JobRun.objects.create(
            job=JobRun.Job.RECONCILE_PAYOUTS, trigger=JobRun.Trigger.SCHEDULE, runner="demo:1",
            apply=True, started_at=started, finished_at=started + timedelta(seconds=2),
            status=JobRun.Status.DRIFTED, counts=result.counts(),
            findings=result.findings())
        return count

    def _demo_payout(self, s: int, p: int) -> Payout:
        return Payout.objects.get(stripe_payout_id__startswith=f"po_1Demo{s:02d}{p:02d}")

    def _ledger_rules(self) -> int:
        """Held events, a reversal and a same-second tie, as Stripe would deliver them."""
        count = 0
        # Seller B's failed payout names seller A's payout: held, A's money stays put.
        paid = self._demo_payout(0, 2)
        obj = stripe_events.payout_object(
            paid.stripe_payout_id, status="failed", amount=paid.amount, created=self._ts(12),
            **stripe_events.failed_payout_defaults())
        count += self._deliver(stripe_events.payout_event(
            "payout.failed", obj, account=SELLERS[1][1], created=self._ts(0.3),
            event_id="evt_1DemoHeldAccount01"))
        # A payout.paid for another amount and currency: held.
        in_transit = self._demo_payout(3, 4)
        obj = stripe_events.payout_object(in_transit.stripe_payout_id, status="paid",
                                          amount=in_transit.amount + 5000, currency="eur",
                                          created=self._ts(6))
        count += self._deliver(stripe_events.payout_event(
            "payout.paid", obj, account=SELLERS[3][1], created=self._ts(0.25),
            event_id="evt_1DemoHeldAmount01"))
        # A paid payout reversed, in Stripe's order: the original's payout.updated with
        # reversed_by, then the reversal's created, updated, paid.
        original = self._demo_payout(4, 1)
        reversal_id = f"po_1DemoReversal{original.stripe_payout_id[-8:]}"
        account = SELLERS[4][1]
        updated = stripe_events.payout_object(
            original.stripe_payout_id, status="paid", amount=original.amount,
            created=self._ts(26), metadata=original.metadata, reversed_by=reversal_id)
        count += self._deliver(stripe_events.payout_event(
            "payout.updated", updated, account=account, created=self._ts(2),
            event_id="evt_1DemoReversal00", previous_attributes={"reversed_by": None}))
        for n, (event_type, status) in enumerate([("payout.created", "pending"),
                                                  ("payout.updated", "in_transit"),
                                                  ("payout.paid", "paid")], start=1):
            obj = stripe_events.payout_object(reversal_id, status=status,
                                              amount=-original.amount, created=self._ts(2),
                                              original_payout=original.stripe_payout_id)
            count += self._deliver(stripe_events.payout_event(
                event_type, obj, account=account, created=self._ts(2) + n * 3600,
                event_id=f"evt_1DemoReversal{n:02d}"))
        # payout.paid and a payout.updated saying paid in the same second: which is newer
        # cannot be told, so the second changes nothing and the payout is to be reconciled.
        tie = self._demo_payout(5, 2)
        assert tie.last_event_created is not None, "its payout.paid was applied above"
        obj = stripe_events.payout_object(tie.stripe_payout_id, status="paid", amount=tie.amount,
                                          created=self._ts(12), metadata=tie.metadata)
        count += self._deliver(stripe_events.payout_event(
            "payout.updated", obj, account=SELLERS[5][1],
            created=int(tie.last_event_created.timestamp()),
            event_id="evt_1DemoSameSecond01", previous_attributes={"status": "in_transit"}))
        return count

    def _past_failure(self) -> int:
        """A payout.paid whose processing failed earlier (as after a database outage),
        waiting an hour for its next try: the one to replay from the console."""
        payout = Payout.objects.filter(status="in_transit", seller__stripe_account_id=SELLERS[2][1]
                                       ).order_by("created_at").first()
        if payout is None:
            return 0
        obj = stripe_events.payout_object(payout.stripe_payout_id, status="paid",
                                          amount=payout.amount, created=self._ts(1))
        event = stripe_events.payout_event("payout.paid", obj, account=SELLERS[2][1],
                                           created=self._ts(0.2), event_id="evt_1DemoReplayMe01")
        if not self._deliver(event, process=False):
            return 0
        error = ("OperationalError: terminating connection due to administrator command "
                 "(SQLSTATE 57P01)")
        now = timezone.now()
        stored = WebhookEvent.objects.get(stripe_event_id=event["id"])
        WebhookEvent.objects.filter(pk=stored.pk).update(
            status=WebhookEvent.Status.FAILED, last_error=error, attempts=1,
            next_attempt_at=now + timedelta(hours=1))
        WebhookEventAttempt.objects.create(
            event=stored, trigger=WebhookEventAttempt.Trigger.INLINE, started_at=now,
            finished_at=now, outcome=WebhookEventAttempt.Outcome.FAILED, reason=error,
            error=error, status_after=WebhookEvent.Status.FAILED)
        return 1
