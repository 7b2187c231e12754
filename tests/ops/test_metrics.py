"""GET /metrics: its token, the named metrics with the right values, and counters added
up across a real gunicorn's worker processes."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import txutils
from payouts import stripe_events
from payouts.models import Alert, Payout, WebhookEvent
from tests.factories import make_payout, make_seller
from tests.ops.test_alerts import make_event, stuck_payout
from tests.payouts.helpers import SECRET, Server, deliver, payout_event, post, server_env

TOKEN = "metrics-token-for-the-tests-0123456789"


def scrape(client: Client, token: str | None = TOKEN) -> Any:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    return client.get("/metrics", **headers)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def token(settings: Any) -> str:
    settings.METRICS_TOKEN = TOKEN
    return TOKEN


@pytest.mark.django_db
def test_off_without_a_token(settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    answer = scrape(Client())
    assert answer.status_code == 404 and b"METRICS_TOKEN is not set" in answer.content


@pytest.mark.django_db
def test_a_missing_or_wrong_token_is_refused(token: str) -> None:
    missing = scrape(Client(), token=None)
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert b"Authorization: Bearer" in missing.content
    wrong = scrape(Client(), token="x" * len(TOKEN))
    assert wrong.status_code == 401 and b"not METRICS_TOKEN" in wrong.content
    basic = Client().get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}")
    assert basic.status_code == 401
    assert Client().post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405


@pytest.mark.django_db
def test_the_scrape_never_touches_sessions(token: str, django_user_model: Any) -> None:
    client = Client()
    client.force_login(django_user_model.objects.create_user("someone", password="x-y-z-w-1"))
    sessions = Session.objects.count()
    answer = scrape(client)
    assert answer.status_code == 200
    assert "Set-Cookie" not in answer.headers and not answer.cookies
    assert Session.objects.count() == sessions
    assert scrape(Client()).status_code == 200  # no login needed


@pytest.mark.django_db
def test_the_named_metrics_and_their_values(token: str) -> None:
    make_event("dead")
    make_event("held")
    make_event("processed")
    make_event("received", next_attempt_at=timezone.now(),
               received_ago=timedelta(seconds=90))
    stuck_payout(hours_past=2)
    make_payout(status="paid", transactions=0)
    make_payout(status="paid", transactions=0)
    Alert.objects.create(rule="held_events", summary="1 held event", opened_at=timezone.now(),
                         last_seen_at=timezone.now())
    answer = scrape(Client())
    assert answer.status_code == 200
    assert answer["Content-Type"].startswith("text/plain; version=")
    found = samples(answer.content.decode())
    for status, count in {"dead": 1, "held": 1, "processed": 1, "received": 1, "failed": 0,
                          "skipped": 0, "ignored": 0}.items():
        assert value(found, "payout_console_webhook_events", status=status) == count, status
    oldest = value(found, "payout_console_webhook_oldest_due_seconds")
    assert oldest is not None and 90 <= oldest < 120
    assert value(found, "payout_console_payouts", status="paid") == 2
    assert value(found, "payout_console_payouts", status="in_transit") == 1
    assert value(found, "payout_console_payouts_stuck_in_transit") == 1
    assert value(found, "payout_console_alerts_open", rule="held_events") == 1
    assert value(found, "payout_console_alerts_open", rule="dead_events") == 0
    assert "# TYPE payout_console_event_processing_seconds histogram" in answer.content.decode()
    assert value(found, "payout_console_event_processing_seconds_count") is not None
    for code in ("40001", "40P01"):
        assert value(found, "payout_console_transaction_retries_total", sqlstate=code) is not None
    assert value(found, "payout_console_webhook_deliveries_total", result="received",
                 reason="") is not None


@pytest.mark.django_db(transaction=True)
def test_deliveries_and_processing_time_are_counted(token: str, settings: Any) -> None:
    """Through the webhook endpoint (Django's test client: this process's counters)."""
    settings.STRIPE_WEBHOOK_SECRETS = [SECRET]
    seller = make_seller()
    before = {r: counted("payout_console_webhook_deliveries_total", result=r, reason="")
              for r in ("received", "duplicate")}
    bad = counted("payout_console_webhook_deliveries_total", result="rejected",
                  reason="bad_signature")
    settled = counted("payout_console_event_processing_seconds_count")
    client = Client()
    event = payout_event("payout.created", f"po_ops{uuid.uuid4().hex[:10]}",
                         created=int(time.time()), account=seller.stripe_account_id)
    body = stripe_events.encode(event)
    for signature_secret in (SECRET, SECRET, "whsec_wrong"):  # new, duplicate, refused
        client.post("/webhooks/stripe/", body, content_type="application/json",
                    HTTP_STRIPE_SIGNATURE=stripe_events.sign(body, signature_secret))
    assert counted("payout_console_webhook_deliveries_total", result="received",
                   reason="") == before["received"] + 1
    assert counted("payout_console_webhook_deliveries_total", result="duplicate",
                   reason="") == before["duplicate"] + 1
    assert counted("payout_console_webhook_deliveries_total", result="rejected",
                   reason="bad_signature") == bad + 1
    assert counted("payout_console_event_processing_seconds_count") == settled + 1
    assert Payout.objects.filter(stripe_payout_id=event["data"]["object"]["id"]).exists()
    found = samples(scrape(client).content.decode())
    assert value(found, "payout_console_webhook_deliveries_total", result="duplicate",
                 reason="") == before["duplicate"] + 1


@pytest.mark.django_db(transaction=True)
def test_transaction_retries_are_counted_by_sqlstate() -> None:
    class Conflict(Exception):
        pgcode = "40001"

    class Deadlock(Exception):
        pgcode = "40P01"

    failures = [Conflict(), Deadlock(), Conflict()]

    @txutils.financial_transaction(operation="ops.test_retries", delay=0)
    def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    before = {code: counted("payout_console_transaction_retries_total", sqlstate=code)
              for code in ("40001", "40P01")}
    assert flaky() == "done"
    assert counted("payout_console_transaction_retries_total", sqlstate="40001") == \
        before["40001"] + 2
    assert counted("payout_console_transaction_retries_total", sqlstate="40P01") == \
        before["40P01"] + 1


@pytest.mark.django_db(transaction=True)
def test_counters_are_added_up_across_gunicorn_workers(
        test_database_url: str, tmp_path: Path) -> None:
    """Three worker processes, each delivery on its own connection: the scrape, answered
    by any one worker, sees every delivery."""
    seller = make_seller()
    metrics_dir = tmp_path / "metrics"
    server = Server(server_env(test_database_url, METRICS_TOKEN=TOKEN,
                               PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)), workers=3, threads=2)
    try:
        new, duplicates, refused = 12, 4, 5
        events = [payout_event("payout.created", f"po_gun{uuid.uuid4().hex[:10]}",
                               created=int(time.time()), account=seller.stripe_account_id)
                  for _ in range(new)]
        for event in events:
            assert deliver(server.url, event).status == 200
        for event in events[:duplicates]:
            assert deliver(server.url, event).json()["duplicate"] is True
        for event in events[:refused]:
            assert deliver(server.url, event, secret="whsec_wrong").status == 400
        pids = {path.name for path in metrics_dir.glob("counter_*.db")}
        assert len(pids) >= 2, f"the deliveries reached one worker only: {pids}"
        for _ in range(3):  # whichever worker answers, the same totals
            answer = post(server.url, b"", {"Authorization": f"Bearer {TOKEN}"}, method="GET",
                          path="/metrics")
            assert answer.status == 200
            found = samples(answer.body.decode())
            assert value(found, "payout_console_webhook_deliveries_total", result="received",
                         reason="") == new
            assert value(found, "payout_console_webhook_deliveries_total", result="duplicate",
                         reason="") == duplicates
            assert value(found, "payout_console_webhook_deliveries_total", result="rejected",
                         reason="bad_signature") == refused
            assert value(found, "payout_console_event_processing_seconds_count") == new
            assert value(found, "payout_console_webhook_events", status="processed") == new
        assert post(server.url, b"", method="GET", path="/metrics").status == 401
    finally:
        server.stop()
    assert WebhookEvent.objects.filter(status="processed").count() == new
