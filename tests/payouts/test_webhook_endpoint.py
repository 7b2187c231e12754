"""POST /webhooks/stripe/ against a real gunicorn process on the test database.

Every delivery goes over HTTP to a server in another process, so every row the
test relies on is committed first (``transaction=True``) and every check reads
what that process committed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db import connection

from payouts import stripe_events
from payouts.models import (
    PaymentTransaction,
    PaymentTransfer,
    Payout,
    TransactionLog,
    WebhookEvent,
    WebhookEventAttempt,
    WebhookRejection,
)
from payouts.services.inbox import MAX_BODY_BYTES
from tests.factories import make_payout
from tests.payouts.helpers import (
    OLD_SECRET,
    SECRET,
    Answer,
    Server,
    deliver,
    payout_event,
    post,
    run_worker,
    server_env,
)

pytestmark = pytest.mark.django_db(transaction=True)

Delivery = tuple[str, bytes, dict[str, str]]  # method, body, headers
DROP = object()  # in ``_event(**changes)``: remove the key
WRONG_SECRET = "whsec_not_one_of_ours"
COUNTED_MODELS = (WebhookEvent, WebhookEventAttempt, Payout, PaymentTransaction, TransactionLog)


# --- small helpers -------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


def _event(payout_id: str, event_type: str = "payout.paid", **changes: Any) -> dict[str, Any]:
    """A realistic payout event for ``payout_id`` (agreeing with our payout, if we know it);
    ``changes`` replace (or DROP) top-level keys."""
    event = payout_event(event_type, payout_id, created=_now())
    for key, value in changes.items():
        if value is DROP:
            event.pop(key, None)
        else:
            event[key] = value
    return event


def _headers(signature: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return headers


def _signed(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> Delivery:
    return "POST", body, _headers(stripe_events.sign(body, secret, timestamp=timestamp))


def _v1(body: bytes, secret: str, timestamp: int) -> str:
    """The v1 signature, computed over raw bytes (works for bodies that are not UTF-8)."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def _shape(payout_id: str, **changes: Any) -> Delivery:
    """A correctly signed delivery whose JSON is the event with ``changes``."""
    return _signed(stripe_events.encode(_event(payout_id, **changes)))


def _json(value: Any) -> Delivery:
    return _signed(json.dumps(value).encode())


def _padded(payout_id: str, size: int) -> bytes:
    """A valid payout event of exactly ``size`` bytes (padding in its metadata)."""
    event = _event(payout_id)
    event["data"]["object"]["metadata"] = {"padding": ""}
    short = len(stripe_events.encode(event))
    event["data"]["object"]["metadata"] = {"padding": "x" * (size - short)}
    body = stripe_events.encode(event)
    assert len(body) == size
    return body


def _send(url: str, delivery: Delivery) -> Answer:
    method, body, headers = delivery
    return post(url, body, headers, method=method)


def _counts() -> dict[str, int]:
    return {model.__name__: model.objects.count() for model in COUNTED_MODELS}


def _rejections() -> dict[str, int]:
    return dict(WebhookRejection.objects.values_list("reason", "count"))


def _payout_state(payout: Payout) -> tuple[Any, ...]:
    payout.refresh_from_db()
    return (payout.status, payout.events_applied, payout.last_event_id, payout.updated_at)


def _paid_to_failed(payout: Payout) -> dict[str, Any]:
    obj = stripe_events.payout_object(payout.stripe_payout_id, amount=payout.amount,
                                      status="failed", **stripe_events.failed_payout_defaults())
    return stripe_events.payout_event("payout.failed", obj,
                                      account=payout.seller.stripe_account_id)


# --- 1. valid and new ----------------------------------------------------------------


def test_a_new_signed_event_is_stored_byte_for_byte_and_applied(inline_server):
    """A valid new event is answered 200 and stored exactly as sent, with its fields."""
    payout = make_payout(status="in_transit")
    created = _now() - 3600  # not the time of receipt: stripe_created must come from the body
    obj = stripe_events.payout_object(payout.stripe_payout_id, amount=payout.amount, status="paid",
                                      metadata={"note": "café ☕", "ключ": "значение 🚀"})
    event = stripe_events.payout_event("payout.paid", obj, created=created,
                                       account=payout.seller.stripe_account_id)
    reordered = dict(reversed(list(event.items())))  # "type" first, "id" last
    text = json.dumps(reordered, ensure_ascii=False, indent="\t", separators=(" ,", " :  "))
    body = ("\r\n  " + text + "\n\n").encode("utf-8")
    assert body.endswith(f'\t"id" :  "{event["id"]}"\n}}\n\n'.encode()) and "☕".encode() in body
    timestamp = _now()
    _, _, headers = _signed(body, timestamp=timestamp)

    answer = post(inline_server.url, body, {**headers, "User-Agent": "Stripe/1.0"})

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False, "status": "processed"}
    stored = WebhookEvent.objects.get()
    assert bytes(stored.raw_body) == body
    assert stored.stripe_event_id == event["id"]
    assert stored.type == "payout.paid"
    assert stored.account == payout.seller.stripe_account_id
    assert stored.livemode is False
    assert stored.api_version == stripe_events.API_VERSION
    assert stored.stripe_created == datetime.fromtimestamp(created, tz=UTC)
    assert stored.stripe_object_id == payout.stripe_payout_id
    assert stored.status == "processed"
    assert stored.headers["stripe-signature"] == f"t={timestamp},v1=…"  # no signature kept
    payout.refresh_from_db()
    assert (payout.status, payout.events_applied) == ("paid", 1)
    assert payout.metadata == {"note": "café ☕", "ключ": "значение 🚀"}


def test_a_body_of_exactly_one_mebibyte_is_accepted(inline_server):
    """The size limit is inclusive: a signed event of exactly 1 MiB is stored."""
    payout = make_payout(status="in_transit")
    body = _padded(payout.stripe_payout_id, MAX_BODY_BYTES)

    answer = _send(inline_server.url, _signed(body))

    assert answer.status == 200, answer.body
    assert bytes(WebhookEvent.objects.get().raw_body) == body


# --- 2. duplicates -------------------------------------------------------------------


def test_a_duplicate_event_id_is_acknowledged_and_changes_nothing(inline_server):
    """A second delivery of an event id, even with another body, is 200 duplicate, no change."""
    payout = make_payout(status="in_transit")
    first = _event(payout.stripe_payout_id)
    assert deliver(inline_server.url, first).json()["status"] == "processed"
    stored = WebhookEvent.objects.get()
    before = (bytes(stored.raw_body), stored.status, stored.attempts, stored.processed_at)
    payout_before = _payout_state(payout)
    counts = _counts()

    second = _event(payout.stripe_payout_id, "payout.failed", id=first["id"])
    second["data"]["object"]["metadata"] = {"second": "delivery"}
    answer = deliver(inline_server.url, second, timestamp=_now() - 5)

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": True}
    stored.refresh_from_db()
    assert (bytes(stored.raw_body), stored.status, stored.attempts, stored.processed_at) == before
    assert stored.type == "payout.paid"
    assert _payout_state(payout) == payout_before
    assert _counts() == counts
    assert WebhookEventAttempt.objects.get().outcome == "applied"


# --- 3. secrets ----------------------------------------------------------------------


def test_a_delivery_signed_with_the_previous_secret_is_accepted(inline_server):
    """While a secret is rolled, a delivery signed with the old one is still stored."""
    payout = make_payout(status="in_transit")
    event = _event(payout.stripe_payout_id)

    answer = deliver(inline_server.url, event, secret=OLD_SECRET)

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False, "status": "processed"}
    assert WebhookEvent.objects.get().stripe_event_id == event["id"]


@pytest.mark.parametrize("good_first", [True, False], ids=["good-first", "good-last"])
def test_one_matching_signature_among_several_v1_is_accepted(inline_server, good_first):
    """A header with two v1 signatures is accepted when one of them matches."""
    payout = make_payout(status="in_transit")
    event = _event(payout.stripe_payout_id)
    body = stripe_events.encode(event)
    timestamp = _now()
    good, bad = _v1(body, SECRET, timestamp), _v1(body, WRONG_SECRET, timestamp)
    first, second = (good, bad) if good_first else (bad, good)

    answer = post(inline_server.url, body, _headers(f"t={timestamp},v1={first},v1={second}"))

    assert answer.status == 200, answer.body
    assert WebhookEvent.objects.get().stripe_event_id == event["id"]


# --- 4. the malformed corpus ---------------------------------------------------------


def _unsigned(payout_id: str, signature: str | None) -> Delivery:
    return "POST", stripe_events.encode(_event(payout_id)), _headers(signature)


def _other_body(payout_id: str) -> Delivery:
    _, _, headers = _shape(payout_id)
    return "POST", stripe_events.encode(_event(payout_id)), headers


def _tampered(payout_id: str) -> Delivery:
    method, body, headers = _shape(payout_id)
    tampered = re.sub(rb'"amount": \d+', b'"amount": 9100', body, count=1)
    assert tampered != body
    return method, tampered, headers


def _invalid_utf8(_: str) -> Delivery:
    body = b'{"id": "evt_\xff\xfe", "object": "event"}'
    timestamp = _now()
    return "POST", body, _headers(f"t={timestamp},v1={_v1(body, SECRET, timestamp)}")


def _data(obj: Any) -> dict[str, Any]:
    return {"object": obj}


CORPUS: list[Any] = [
    # --- the signature header
    pytest.param(lambda p: _unsigned(p, None), 400, "missing_signature", id="no-header"),
    pytest.param(lambda p: _unsigned(p, ""), 400, "missing_signature", id="empty-header"),
    pytest.param(lambda p: _unsigned(p, "garbage"), 400, "malformed_signature", id="garbage"),
    pytest.param(lambda p: _unsigned(p, "v1=" + "a" * 64), 400, "malformed_signature",
                 id="no-t"),
    pytest.param(lambda p: _unsigned(p, f"t={_now()}"), 400, "malformed_signature",
                 id="t-without-v1"),
    pytest.param(lambda p: _unsigned(p, f"t=now,v1={'a' * 64}"), 400, "malformed_signature",
                 id="t-not-a-number"),
    pytest.param(lambda p: _unsigned(p, stripe_events.sign(
        stripe_events.encode(_event(p)), SECRET).replace("v1=", "v0=")),
        400, "malformed_signature", id="v0-only"),
    pytest.param(lambda p: _signed(stripe_events.encode(_event(p)), WRONG_SECRET), 400,
                 "bad_signature", id="wrong-secret"),
    pytest.param(_other_body, 400, "bad_signature", id="signature-of-another-body"),
    pytest.param(_tampered, 400, "bad_signature", id="tampered-after-signing"),
    pytest.param(lambda p: _signed(stripe_events.encode(_event(p)), timestamp=_now() - 301), 400,
                 "stale_timestamp", id="stale-timestamp"),
    pytest.param(lambda p: _signed(stripe_events.encode(_event(p)), WRONG_SECRET, _now() - 301),
                 400, "bad_signature", id="stale-and-wrong-secret"),
    # --- the body
    pytest.param(_invalid_utf8, 400, "invalid_utf8", id="invalid-utf8"),
    pytest.param(lambda p: _signed(b"hello, stripe"), 400, "invalid_json", id="not-json"),
    pytest.param(lambda p: _signed(b""), 400, "invalid_json", id="empty-body"),
    pytest.param(lambda p: _signed(stripe_events.encode(_event(p))[:-2]), 400, "invalid_json",
                 id="truncated-json"),
    pytest.param(lambda p: _json([_event(p)]), 400, "not_an_event", id="json-array"),
    pytest.param(lambda p: _json("evt_123"), 400, "not_an_event", id="json-string"),
    pytest.param(lambda p: _json(None), 400, "not_an_event", id="json-null"),
    pytest.param(lambda p: _json(42), 400, "not_an_event", id="json-number"),
    # --- the event's shape
    pytest.param(lambda p: _shape(p, object="payout"), 400, "not_an_event", id="object-payout"),
    pytest.param(lambda p: _json({
        "id": stripe_events.new_id("evt"), "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered", "created": "2025-10-01T12:00:00.000Z",
        "livemode": False, "related_object": {"id": "mtr_123", "type": "billing.meter",
                                              "url": "/v1/billing/meters/mtr_123"},
    }), 400, "not_an_event", id="thin-v2-event"),
    pytest.param(lambda p: _shape(p, object=DROP), 400, "not_an_event", id="object-missing"),
    pytest.param(lambda p: _shape(p, id=DROP), 400, "not_an_event", id="id-missing"),
    pytest.param(lambda p: _shape(p, id="ch_3PqZ"), 400, "not_an_event", id="id-not-evt"),
    pytest.param(lambda p: _shape(p, id=12345), 400, "not_an_event", id="id-a-number"),
    pytest.param(lambda p: _shape(p, type=DROP), 400, "not_an_event", id="type-missing"),
    pytest.param(lambda p: _shape(p, type=""), 400, "not_an_event", id="type-empty"),
    pytest.param(lambda p: _shape(p, created=DROP), 400, "not_an_event", id="created-missing"),
    pytest.param(lambda p: _shape(p, created=str(_now())), 400, "not_an_event",
                 id="created-a-string"),
    pytest.param(lambda p: _shape(p, created=True), 400, "not_an_event", id="created-boolean"),
    pytest.param(lambda p: _shape(p, created=_now() + 0.5), 400, "not_an_event",
                 id="created-a-float"),
    pytest.param(lambda p: _shape(p, created=0), 400, "not_an_event", id="created-zero"),
    pytest.param(lambda p: _shape(p, data=DROP), 400, "not_an_event", id="data-missing"),
    pytest.param(lambda p: _shape(p, data=[]), 400, "not_an_event", id="data-a-list"),
    pytest.param(lambda p: _shape(p, data={"previous_attributes": {}}), 400, "not_an_event",
                 id="data-object-missing"),
    pytest.param(lambda p: _shape(p, data=_data("po_123")), 400, "not_an_event",
                 id="data-object-a-string"),
    pytest.param(lambda p: _shape(p, data=_data({"id": "ch_3PqZ", "object": "charge"})), 400,
                 "not_an_event", id="payout-event-with-a-charge"),
    pytest.param(lambda p: _shape(p, data=_data(stripe_events.payout_object(
        "tr_1PqZ", status="paid"))), 400, "not_an_event", id="payout-event-without-po-id"),
    pytest.param(lambda p: _shape(p, data=_data({"object": "payout"})), 400, "not_an_event",
                 id="payout-event-id-missing"),
    pytest.param(lambda p: _shape(p, livemode="false"), 400, "not_an_event",
                 id="livemode-a-string"),
    pytest.param(lambda p: _shape(p, livemode=None), 400, "not_an_event", id="livemode-null"),
    pytest.param(lambda p: _shape(p, account=12345), 400, "not_an_event", id="account-a-number"),
    pytest.param(lambda p: _shape(p, api_version=["2025-09-30"]), 400, "not_an_event",
                 id="api-version-a-list"),
    # --- size and method
    pytest.param(lambda p: _signed(_padded(p, MAX_BODY_BYTES + 1)), 413, "too_large",
                 id="one-byte-over-1MiB"),
    pytest.param(lambda p: _signed(_padded(p, 2 * MAX_BODY_BYTES)), 413, "too_large",
                 id="2MiB"),
    pytest.param(lambda p: ("GET", b"", {}), 405, "method_not_allowed", id="GET"),
    pytest.param(lambda p: ("PUT", *_shape(p)[1:]), 405, "method_not_allowed", id="PUT"),
    pytest.param(lambda p: ("DELETE", b"", {}), 405, "method_not_allowed", id="DELETE"),
]


@pytest.mark.parametrize(("build", "status", "reason"), CORPUS)
def test_a_malformed_delivery_is_refused_and_only_counted(
    inline_server, build: Callable[[str], Delivery], status: int, reason: str
):
    """A malformed delivery gets its status and reason; only its rejection counter changes."""
    payout = make_payout(status="in_transit")  # every corpus event targets it
    seed = _event(payout.stripe_payout_id, "payout.updated")
    assert deliver(inline_server.url, seed).status == 200  # rows in every counted table
    counts, rejections, state = _counts(), _rejections(), _payout_state(payout)

    answer = _send(inline_server.url, build(payout.stripe_payout_id))

    assert answer.status == status, answer.body
    assert answer.json()["error"] == reason
    if status == 405:
        assert answer.headers.get("Allow") == "POST"
    assert _counts() == counts
    assert _payout_state(payout) == state
    assert _rejections() == {**rejections, reason: rejections.get(reason, 0) + 1}



@pytest.fixture(scope="module")
def unconfigured_server(test_database_url: str) -> Iterator[Server]:
    """A server with no webhook secret at all."""
    server = Server(server_env(test_database_url, STRIPE_WEBHOOK_SECRET=""), workers=1,
                    threads=2)
    yield server
    server.stop()


def test_a_server_without_a_secret_refuses_everything(unconfigured_server):
    """With no secret configured, even a well signed delivery is a 503 not_configured."""
    payout = make_payout(status="in_transit")
    counts, state = _counts(), _payout_state(payout)

    answer = deliver(unconfigured_server.url, _event(payout.stripe_payout_id))

    assert (answer.status, answer.json()["error"]) == (503, "not_configured")
    assert _counts() == counts
    assert _payout_state(payout) == state
    assert _rejections() == {"not_configured": 1}


# --- 5. concurrency ------------------------------------------------------------------


def _all_at_once(count: int, action: Callable[[], Answer]) -> list[Answer]:
    """Run ``action`` in ``count`` threads released together by a barrier; all answers."""
    barrier = threading.Barrier(count, timeout=30)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = action()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads)
    assert all(isinstance(result, Answer) for result in results), results
    return results


def test_sixteen_simultaneous_deliveries_apply_the_event_once(inline_server, worker_env):
    """16 deliveries of one event at once: all 200, one stored event, one applied effect."""
    payout = make_payout(status="paid", transactions=4)
    body = stripe_events.encode(_paid_to_failed(payout))
    _, _, headers = _signed(body)

    answers = _all_at_once(16, lambda: post(inline_server.url, body, headers))

    assert [a.status for a in answers] == [200] * 16, [a.body for a in answers]
    assert sorted(a.json()["duplicate"] for a in answers) == [False] + [True] * 15
    [first] = [a.json()["status"] for a in answers if not a.json()["duplicate"]]
    event = WebhookEvent.objects.get()
    if first == "received":
        # The delivery that stored the event found a twin holding the payout (NOWAIT)
        # and left it to the inbox, as any busy delivery; a worker applies it when due.
        for _ in range(50):  # bounded: the postponement is at most 2 s
            run_worker(worker_env, "--once")
            event.refresh_from_db()
            if event.status == "processed":
                break
    else:
        assert first == "processed"
    assert event.status == "processed"
    attempts = WebhookEventAttempt.objects.filter(event=event, outcome="applied")
    assert attempts.count() == 1
    payout.refresh_from_db()
    assert (payout.status, payout.events_applied) == ("failed", 1)
    # Twins that got past the duplicate check roll back (and are logged so); one commits
    # the effect.
    assert TransactionLog.objects.filter(operation="webhook.process_event", outcome="committed",
                                         payout=payout).count() == 1
    transactions = PaymentTransaction.objects.filter(seller=payout.seller)
    assert list(transactions.values_list("payed_out", "actual_release_date")) == [
        (False, None)] * 4
    transfers = PaymentTransfer.objects.filter(payout_items__payout=payout)
    assert sorted(transfers.values_list("status", flat=True)) == ["failed"] * 4


# --- 6. processing failures are never a 5xx ------------------------------------------


def test_an_event_for_an_unknown_payout_is_stored_to_wait(inline_server):
    """A payout event before its payout exists: 200, stored, failed with a next attempt."""
    event = _event(stripe_events.new_id("po"))

    answer = deliver(inline_server.url, event)

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False, "status": "failed"}
    stored = WebhookEvent.objects.get()
    assert (stored.stripe_event_id, stored.status) == (event["id"], "failed")
    assert stored.next_attempt_at is not None
    assert "is not known yet" in stored.last_error
    assert WebhookEventAttempt.objects.get().outcome == "retry"
    assert not Payout.objects.exists()


def test_an_unhandled_event_type_is_stored_and_ignored(inline_server):
    """A charge.succeeded event is stored and ignored, with a 200."""
    charge = {"id": "ch_3PqZ1x", "object": "charge", "amount": 2000, "currency": "usd",
              "status": "succeeded", "metadata": {}}
    event = stripe_events.payout_event("charge.succeeded", charge)

    answer = deliver(inline_server.url, event)

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False, "status": "ignored"}
    stored = WebhookEvent.objects.get()
    assert (stored.type, stored.status, stored.stripe_object_id) == (
        "charge.succeeded", "ignored", "ch_3PqZ1x")
    assert WebhookEventAttempt.objects.get().outcome == "ignored"


def test_a_crash_while_applying_is_stored_as_failed_not_a_5xx(inline_server):
    """An error inside the ledger update (a NUL PostgreSQL refuses) is a 200, event failed."""
    payout = make_payout(status="in_transit")
    event = _event(payout.stripe_payout_id)
    event["data"]["object"]["metadata"] = {"note": "nul \u0000 inside"}
    state = _payout_state(payout)

    answer = deliver(inline_server.url, event)

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False, "status": "failed"}
    stored = WebhookEvent.objects.get()
    assert (stored.status, stored.next_attempt_at is not None) == ("failed", True)
    assert stored.last_error
    attempt = WebhookEventAttempt.objects.get()
    assert attempt.outcome == "failed"
    assert "Traceback" in attempt.traceback and "_store_and_apply" in attempt.traceback
    assert _payout_state(payout) == state


# --- 7. deferred processing ----------------------------------------------------------


def test_the_deferred_server_only_stores(deferred_server):
    """With deferred processing a valid event is stored as received and not applied."""
    payout = make_payout(status="in_transit")
    state = _payout_state(payout)
    event = _event(payout.stripe_payout_id)

    answer = deliver(deferred_server.url, event)

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False}
    stored = WebhookEvent.objects.get()
    assert (stored.stripe_event_id, stored.status, stored.attempts) == (event["id"], "received", 0)
    assert bytes(stored.raw_body) == stripe_events.encode(event)
    assert not WebhookEventAttempt.objects.exists()
    assert _payout_state(payout) == state


# --- 8. unauthenticated input never grows the database -------------------------------


def _event_table_size() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_total_relation_size(%s::regclass)",
                       [WebhookEvent._meta.db_table])
        return int(cursor.fetchone()[0])


def test_fifty_bad_signatures_only_bump_one_counter(deferred_server):
    """50 unsigned deliveries of many sizes leave the event table as it was; one counter +50."""
    payout = make_payout(status="in_transit")
    assert deliver(deferred_server.url, _event(payout.stripe_payout_id)).status == 200
    count, size, rejections = WebhookEvent.objects.count(), _event_table_size(), _rejections()

    for k in range(50):
        body = _padded(payout.stripe_payout_id, 2000 + k * 20_000)
        answer = _send(deferred_server.url, _signed(body, WRONG_SECRET))
        assert (answer.status, answer.json()["error"]) == (400, "bad_signature")

    assert WebhookEvent.objects.count() == count
    assert _event_table_size() == size
    assert WebhookRejection.objects.filter(reason="bad_signature").count() == 1
    assert _rejections() == {**rejections,
                             "bad_signature": rejections.get("bad_signature", 0) + 50}


# --- signed input that PostgreSQL or datetime cannot hold: a 400, never a 500 -----------


@pytest.mark.parametrize("changes", [
    pytest.param({"created": 253402300800}, id="created-after-year-9999"),
    pytest.param({"id": "evt_nul\u0000"}, id="nul-in-id"),
    pytest.param({"id": "evt_\ud800"}, id="lone-surrogate-in-id"),
    pytest.param({"account": "acct_\u0000"}, id="nul-in-account"),
])
def test_a_signed_event_that_cannot_be_stored_is_refused(inline_server, changes):
    """A signed event with values PostgreSQL or datetime cannot hold is a 400, not a crash."""
    payout = make_payout(status="in_transit")
    counts = _counts()

    answer = _send(inline_server.url, _shape(payout.stripe_payout_id, **changes))

    assert answer.status == 400, (answer.status, answer.body[:200])
    assert answer.json()["error"] == "not_an_event"
    assert _counts() == counts
    assert _rejections() == {"not_an_event": 1}
