"""Bulk replays: run by the workers exactly once each, canceled, resumed, approved."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.db import connections
from django.db.models import Count
from django.utils import timezone

from payouts.models import AuditEntry, BulkReplay, WebhookEvent, WebhookEventAttempt
from payouts.roles import ensure_roles
from payouts.services import bulk_replay, inbox
from payouts.services.outcome import Outcome
from payouts.services.processing import event_process, event_replay
from payouts.worker import Worker
from tests.factories import make_payout
from tests.payouts.helpers import payout_event, run_together

pytestmark = pytest.mark.django_db(transaction=True)  # workers' own transactions and threads

T0 = int(time.time()) - 3600
Status = BulkReplay.Status


def user(name: str, role: str) -> User:
    ensure_roles(Group, Permission)
    person = User.objects.create_user(name, password="x" * 12)
    person.groups.add(Group.objects.get(name=role))
    return User.objects.get(pk=person.pk)  # no cached permissions


def stored(event: dict) -> int:
    from payouts import stripe_events

    recorded = inbox.event_record(event, stripe_events.encode(event), {}, lease_s=0)
    assert recorded.event_id is not None
    return recorded.event_id


def waiting_events(applies: int, *, skips: int = 0, holds: int = 0) -> list[int]:
    """Events a replay would apply (payout.paid of payouts in transit), skip (applied
    already) and hold (an amount that is not ours), none of them due for a worker."""
    ids = []
    for n in range(applies + skips + holds):
        payout = make_payout(status="in_transit", transactions=1)
        fields = {"amount": 1} if n >= applies + skips else {}
        ids.append(stored(payout_event("payout.paid", payout.stripe_payout_id, "paid",
                                       created=T0, **fields)))
        if applies <= n < applies + skips:
            assert event_process(event_id=ids[-1], trigger="inline").kind == Outcome.APPLIED
    # Failed, retried in an hour: only the bulk replay runs them, not the workers' loop.
    WebhookEvent.objects.filter(pk__in=ids, status__in=WebhookEvent.PENDING).update(
        status=WebhookEvent.Status.FAILED, next_attempt_at=timezone.now() + timedelta(hours=1))
    return ids


def replays_per_event(ids: list[int]) -> dict[int, int]:
    rows = (WebhookEventAttempt.objects.filter(event_id__in=ids, trigger="replay")
            .values("event_id").annotate(n=Count("id")))
    return {row["event_id"]: row["n"] for row in rows}


def ask(ids: list[int], requester: User, description: str = "status failed") -> BulkReplay:
    return bulk_replay.bulk_request(requested_by=requester, event_ids=ids,
                                    filter_params={"status": ["failed"]},
                                    description=description)


def test_a_worker_replays_each_of_120_events_exactly_once_with_its_counts():
    support = user("support", "Support")
    ids = waiting_events(100, skips=10, holds=10)
    job = ask(ids, support)
    assert (job.status, job.total, job.done) == (Status.QUEUED, 120, 0)

    Worker(name="w1").run(once=True)

    job.refresh_from_db()
    assert (job.status, job.done, job.total) == (Status.DONE, 120, 120)
    assert job.counts == {"applied": 100, "skipped": 10, "held": 10, "failed": 0,
                          "ignored": 0, "retry": 0}
    assert job.finished_at is not None and job.leased_by == "" and not job.cancel_requested
    assert replays_per_event(ids) == dict.fromkeys(ids, 1)
    assert set(WebhookEventAttempt.objects.filter(trigger="replay")
               .values_list("requested_by__username", flat=True)) == {"support"}
    replays = AuditEntry.objects.filter(action="replay")
    assert replays.count() == 120
    assert all(e.detail.endswith(f"(bulk replay {job.pk})") for e in replays)
    asked, finished = AuditEntry.objects.filter(action="bulk_replay").order_by("id")
    assert (asked.outcome, asked.target, asked.actor) == ("requested", f"bulk replay {job.pk}",
                                                         support)
    assert "status failed: 120 events" in asked.detail
    assert finished.outcome == "done"
    assert "120 of 120 replayed (100 applied, 10 skipped, 10 held)" in finished.detail
    assert bulk_replay.claim("w2") is None  # nothing left to run


def test_a_cancel_stops_a_running_job_at_its_next_save():
    support, other = user("support", "Support"), user("support2", "Support")
    ids = waiting_events(120)
    job = ask(ids, support)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            bulk_replay.run_next("w1")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    worker = threading.Thread(target=work)
    worker.start()
    deadline = time.monotonic() + 60
    while BulkReplay.objects.get(pk=job.pk).done < bulk_replay.FLUSH_EVERY:
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.01)
    bulk_replay.bulk_cancel(job.pk, requested_by=other)
    worker.join(60)
    assert not worker.is_alive() and not errors

    job.refresh_from_db()
    assert job.status == Status.CANCELED and job.cancel_requested
    assert bulk_replay.FLUSH_EVERY <= job.done < job.total
    # Every event it replayed is counted, and none after it stopped.
    assert sum(replays_per_event(ids).values()) == job.done == job.applied
    assert list(AuditEntry.objects.filter(action="bulk_replay").order_by("id")
                .values_list("outcome", "actor__username")) == [
        ("requested", "support"), ("cancel_requested", "support2"), ("canceled", "support")]
    with pytest.raises(bulk_replay.WrongState):
        bulk_replay.bulk_cancel(job.pk, requested_by=other)


def test_a_queued_job_canceled_is_never_run():
    support = user("support", "Support")
    ids = waiting_events(3)
    job = bulk_replay.bulk_cancel(ask(ids, support).pk, requested_by=support)
    assert (job.status, job.cancel_requested) == (Status.CANCELED, True)
    assert bulk_replay.run_next("w1") is None
    assert replays_per_event(ids) == {}


def test_workers_claiming_at_once_never_run_the_same_job_twice():
    support = user("support", "Support")
    first, second = ask(waiting_events(30), support), ask(waiting_events(30), support)

    results = run_together(*[lambda n=n: bulk_replay.run_next(f"w{n}") for n in range(3)])

    assert not [r for r in results if isinstance(r, BaseException)], results
    ran = sorted(r.pk for r in results if r is not None)
    assert ran == sorted([first.pk, second.pk]) and results.count(None) == 1
    for job in (first, second):
        job.refresh_from_db()
        # Two jobs at once on a small table can make a replay's SERIALIZABLE transaction
        # conflict more than its retries allow: it comes back "retry", and the event is
        # left to the inbox (retried later), never applied twice.
        assert (job.status, job.done) == (Status.DONE, 30)
        assert job.applied + job.retry == 30, (job.applied, job.retry)
        assert replays_per_event(job.event_ids) == dict.fromkeys(job.event_ids, 1)


def test_a_job_whose_worker_died_is_resumed_from_its_last_save():
    support = user("support", "Support")
    ids = waiting_events(40)
    job = ask(ids, support)
    assert bulk_replay.claim("dead-worker") == job.pk
    for event_id in ids[:25]:  # it replayed 25 events, saved after 20, then died
        event_replay(event_id=event_id, requested_by=support, detail=f" (bulk replay {job.pk})")
    BulkReplay.objects.filter(pk=job.pk).update(done=20, applied=20)
    assert bulk_replay.claim("w2") is None  # its lease still holds

    BulkReplay.objects.filter(pk=job.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    resumed = bulk_replay.run_next("w2")

    assert resumed is not None and resumed.pk == job.pk
    assert (resumed.status, resumed.done) == (Status.DONE, 40)
    # The five replayed after the last save ran again, harmlessly: skipped, counted once.
    assert (resumed.applied, resumed.skipped) == (35, 5)
    per_event = replays_per_event(ids)
    assert [per_event[i] for i in ids] == [1] * 20 + [2] * 5 + [1] * 15
    assert WebhookEvent.objects.filter(pk__in=ids, status="processed").count() == 40


def test_a_worker_that_stops_lets_another_resume_at_once():
    support = user("support", "Support")
    ids = waiting_events(12)
    job = ask(ids, support)
    replayed = iter(range(100))
    stopped = bulk_replay.run_next("w1", stopping=lambda: next(replayed) >= 5)
    assert stopped is not None
    stopped.refresh_from_db()
    assert (stopped.status, stopped.done) == (Status.RUNNING, 5)

    resumed = bulk_replay.run_next("w2")
    assert resumed is not None and (resumed.pk, resumed.status, resumed.done) == (
        job.pk, Status.DONE, 12)
    assert replays_per_event(ids) == dict.fromkeys(ids, 1)


# --- four eyes ------------------------------------------------------------------------------


@pytest.fixture
def live(settings):
    settings.STRIPE_LIVEMODE = True
    settings.BULK_REPLAY_APPROVAL_THRESHOLD = 5
    return settings


def test_a_large_live_job_waits_for_another_support_person(live):
    support, colleague = user("support", "Support"), user("colleague", "Support")
    manager = user("manager", "Managers")
    ids = waiting_events(6)
    job = ask(ids, support)
    assert job.status == Status.AWAITING_APPROVAL
    assert list(bulk_replay_pending()) == [job.pk]
    assert bulk_replay.run_next("w1") is None  # the workers leave it alone

    with pytest.raises(bulk_replay.NotAllowed, match="another Support person"):
        bulk_replay.bulk_decide(job.pk, decided_by=support, approve=True, reason="mine")
    with pytest.raises(bulk_replay.NotAllowed, match="only Support"):
        bulk_replay.bulk_decide(job.pk, decided_by=manager, approve=True, reason="ok")
    with pytest.raises(bulk_replay.BulkReplayRefused, match="reason is required"):
        bulk_replay.bulk_decide(job.pk, decided_by=colleague, approve=True, reason="  ")
    job.refresh_from_db()
    assert job.status == Status.AWAITING_APPROVAL and job.decided_by is None

    approved = bulk_replay.bulk_decide(job.pk, decided_by=colleague, approve=True,
                                       reason="checked with Stripe: the outage is over")
    assert (approved.status, approved.decided_by, approved.decision_reason) == (
        Status.QUEUED, colleague, "checked with Stripe: the outage is over")
    with pytest.raises(bulk_replay.WrongState):
        bulk_replay.bulk_decide(job.pk, decided_by=colleague, approve=False, reason="too late")
    [entry] = AuditEntry.objects.filter(action="approval")
    assert (entry.actor, entry.outcome, entry.target) == (colleague, "approved", str(job))
    assert entry.detail.startswith("checked with Stripe: the outage is over")
    assert list(bulk_replay_pending()) == []
    # Live mode ignores these test-mode events, but the job runs them all, once each.
    assert bulk_replay.run_next("w1").status == Status.DONE
    assert replays_per_event(ids) == dict.fromkeys(ids, 1)


def test_a_rejected_job_never_runs(live):
    support, colleague = user("support", "Support"), user("colleague", "Support")
    job = ask(waiting_events(6), support)
    rejected = bulk_replay.bulk_decide(job.pk, decided_by=colleague, approve=False,
                                       reason="replay these one by one")
    assert (rejected.status, rejected.finished_at is not None) == (Status.REJECTED, True)
    assert bulk_replay.run_next("w1") is None
    entry = AuditEntry.objects.get(action="approval")
    assert (entry.outcome, entry.detail.split(" (")[0]) == ("rejected", "replay these one by one")


def test_approval_needs_live_mode_and_more_than_the_threshold(live):
    support = user("support", "Support")
    assert ask(waiting_events(5), support).status == Status.QUEUED  # at the threshold
    live.STRIPE_LIVEMODE = False
    assert ask(waiting_events(6), support).status == Status.QUEUED  # test mode


def test_only_support_may_ask_and_an_empty_list_is_refused():
    with pytest.raises(bulk_replay.NotAllowed):
        ask(waiting_events(1), user("manager", "Managers"))
    with pytest.raises(bulk_replay.BulkReplayRefused, match="no event matches"):
        ask([], user("support", "Support"))
    assert not BulkReplay.objects.exists()


def bulk_replay_pending() -> list[int]:
    from payouts.selectors import pending_approvals

    return list(pending_approvals().values_list("pk", flat=True))
