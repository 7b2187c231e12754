"""The ledger is read-only in the admin, even for a superuser (DEBUG off, the whole
middleware stack through Django's test client): payouts, items, transfers, transactions,
events, attempts, transaction logs, rejections and job runs cannot be added, changed or
deleted there. Sellers, users and groups stay editable; *Replay selected events* still
works, through the service, and leaves its record.

The probe from the issue: "Superusers can add payouts and edit status, amount, seller and
transactions in the admin".
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Group, User
from django.db import models
from django.forms.models import model_to_dict
from django.test import Client
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from payouts import stripe_events
from payouts.models import (
    JobRun,
    PaymentTransaction,
    PaymentTransfer,
    Payout,
    PayoutItem,
    ScheduledJob,
    Seller,
    TransactionLog,
    WebhookEvent,
    WebhookEventAttempt,
    WebhookRejection,
)
from payouts.services import inbox
from tests.factories import make_payout, make_seller
from tests.payouts.helpers import payout_event

PASSWORD = "correct horse battery staple"


@pytest.fixture
def admin(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", password=PASSWORD))
    return client


def ledger() -> dict[type[models.Model], models.Model]:
    """One row of each read-only model."""
    payout = make_payout(status="in_transit", transactions=2)
    item = PayoutItem.objects.filter(payout=payout).first()
    now = timezone.now()
    event = WebhookEvent.objects.create(
        stripe_event_id="evt_readonly", type="payout.paid", raw_body=b"{}", stripe_created=now,
        stripe_object_id=payout.stripe_payout_id, status="failed")
    return {
        Payout: payout,
        PaymentTransfer: item.payment_transfer,
        PaymentTransaction: item.payment_transfer.payment_transaction,
        WebhookEvent: event,
        WebhookEventAttempt: WebhookEventAttempt.objects.create(
            event=event, trigger="worker", started_at=now, finished_at=now, outcome="retry",
            status_after="failed"),
        TransactionLog: TransactionLog.objects.create(
            operation="event_process", isolation_level="serializable", attempts=1,
            duration_ms=1.0, outcome="committed", started_at=now, event=event, payout=payout),
        WebhookRejection: WebhookRejection.objects.create(reason="bad_signature", count=3,
                                                          last_seen_at=now),
        JobRun: JobRun.objects.create(job="sync_events", trigger="command", started_at=now),
        ScheduledJob: ScheduledJob.objects.create(name="sync_events"),
    }


def url(model: type[models.Model], view: str, obj: models.Model | None = None) -> str:
    name = f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}"
    return reverse(name, args=[] if obj is None else [quote(obj.pk)])


def state(obj: models.Model) -> dict[str, Any]:
    return model_to_dict(type(obj).objects.get(pk=obj.pk))


# What a superuser would type into each change form: the probe's status, amount, seller.
EDITS: dict[type[models.Model], dict[str, Any]] = {
    Payout: {"status": "paid", "amount": "1", "currency": "usd", "failure_code": "",
             "items-TOTAL_FORMS": "0", "items-INITIAL_FORMS": "0"},
    PaymentTransfer: {"status": "paid", "amount": "1"},
    PaymentTransaction: {"payed_out": "", "amount": "1", "currency": "usd",
                         "release_date": "2024-01-01"},
    WebhookEvent: {"status": "processed", "status_reason": "edited by hand"},
    WebhookEventAttempt: {"outcome": "applied"},
    TransactionLog: {"outcome": "rolled_back"},
    WebhookRejection: {"count": "0"},
    JobRun: {"status": "ok"},
    ScheduledJob: {"leased_by": "me"},
}


@pytest.mark.django_db
def test_a_superuser_cannot_add_change_or_delete_the_ledger(admin):
    rows = ledger()
    other_seller = make_seller()
    EDITS[Payout]["seller"] = str(other_seller.pk)
    for model, obj in rows.items():
        before = state(obj)
        label = model.__name__
        assert admin.get(url(model, "changelist")).status_code == 200, label
        page = admin.get(url(model, "change", obj))
        assert page.status_code == 200, label  # viewing stays
        assert b'name="_save"' not in page.content, label
        assert b"Delete" not in page.content.split(b'id="content"')[1], label

        assert admin.get(url(model, "add")).status_code == 403, label
        assert admin.post(url(model, "add"), EDITS[model]).status_code == 403, label
        assert admin.post(url(model, "change", obj), EDITS[model]).status_code == 403, label
        assert admin.get(url(model, "delete", obj)).status_code == 403, label
        assert admin.post(url(model, "delete", obj), {"post": "yes"}).status_code == 403, label
        # No bulk delete either: the action is not offered, so nothing happens.
        admin.post(url(model, "changelist"), {"action": "delete_selected", "post": "yes",
                                              "_selected_action": [obj.pk]})
        assert state(obj) == before, label
    assert PayoutItem.objects.count() == 2


@pytest.mark.django_db
def test_payout_items_show_on_their_payout_read_only(admin):
    payout = make_payout(transactions=2)
    page = admin.get(url(Payout, "change", payout)).content.decode()
    assert page.count("tr_test") >= 2  # the items' transfers, shown
    assert 'name="items-0-payment_transfer"' not in page
    with pytest.raises(NoReverseMatch):  # no admin of its own
        url(PayoutItem, "changelist")


@pytest.mark.django_db
def test_sellers_users_and_groups_stay_editable(admin):
    seller = make_seller()
    response = admin.post(url(Seller, "change", seller), {
        "name": "Renamed Seller", "stripe_account_id": seller.stripe_account_id})
    assert response.status_code == 302
    seller.refresh_from_db()
    assert seller.name == "Renamed Seller"
    assert admin.post(url(Seller, "add"), {"name": "New Seller",
                                           "stripe_account_id": "acct_new"}).status_code == 302

    assert admin.post(url(Group, "add"), {"name": "Auditors"}).status_code == 302
    assert Group.objects.filter(name="Auditors").exists()
    staff = User.objects.create_user("staff", password=PASSWORD)
    assert b'name="_save"' in admin.get(url(User, "change", staff)).content
    assert admin.post(url(User, "delete", staff), {"post": "yes"}).status_code == 302
    assert not User.objects.filter(username="staff").exists()


@pytest.mark.django_db(transaction=True)  # the replay runs its own SERIALIZABLE transaction
def test_the_replay_action_still_works_and_leaves_a_record(admin):
    payout = make_payout(status="in_transit", transactions=2)
    event = payout_event("payout.paid", payout.stripe_payout_id,
                         created=int(time.time()) - 60)
    recorded = inbox.event_record(event, stripe_events.encode(event), {}, lease_s=0)
    stored = WebhookEvent.objects.get(pk=recorded.event_id)
    WebhookEvent.objects.filter(pk=stored.pk).update(
        status="failed", next_attempt_at=timezone.now() + timedelta(hours=1))

    response = admin.post(url(WebhookEvent, "changelist"), {
        "action": "replay_selected", "_selected_action": [stored.pk]}, follow=True)
    assert b"Replayed: 1 applied" in response.content
    payout.refresh_from_db()
    assert payout.status == "paid"
    attempt = WebhookEventAttempt.objects.get(event=stored, trigger="replay")
    assert attempt.requested_by.username == "root" and attempt.outcome == "applied"
    assert TransactionLog.objects.filter(event=stored).exists()
