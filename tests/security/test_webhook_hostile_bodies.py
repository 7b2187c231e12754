"""Hostile but signed webhook bodies, against a real gunicorn with DEBUG off.

Whoever holds (or stole) the endpoint secret can sign anything: a body nested a
hundred thousand levels deep, JSON that is not an object, a signature dated years
ahead, a body sent chunked without a length. Each is a 4xx with its reason, counted,
and nothing stored; never a 500, and never "bad_signature" for a body that was
signed right.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.test import RequestFactory

from payouts import selectors, stripe_events
from payouts.models import Payout, WebhookEvent, WebhookEventAttempt, WebhookRejection
from payouts.services.inbox import MAX_BODY_BYTES, MAX_JSON_DEPTH, SIGNATURE_TOLERANCE_S
from payouts.views import stripe_webhook
from tests.factories import make_payout
from tests.payouts.helpers import SECRET, WEBHOOK_PATH, Answer, payout_event, post

pytestmark = pytest.mark.django_db(transaction=True)

WRONG_SECRET = "whsec_not_one_of_ours"


def _now() -> int:
    return int(time.time())


def _headers(body: bytes, *, secret: str = SECRET, timestamp: int | None = None
             ) -> dict[str, str]:
    return {"Content-Type": "application/json",
            "Stripe-Signature": stripe_events.sign(body, secret, timestamp=timestamp)}


def _send_signed(url: str, body: bytes, **sign: Any) -> Answer:
    return post(url, body, _headers(body, **sign))


def _event(payout_id: str, **metadata: Any) -> dict[str, Any]:
    event = payout_event("payout.paid", payout_id, created=_now())
    if metadata:
        event["data"]["object"]["metadata"] = metadata
    return event


def _compact(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def _nested(depth: int, leaf: Any = "x") -> Any:
    """``depth`` levels of objects, innermost holding ``leaf``."""
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


def _stored() -> tuple[int, int]:
    return WebhookEvent.objects.count(), WebhookEventAttempt.objects.count()


def _rejections() -> dict[str, int]:
    return dict(WebhookRejection.objects.values_list("reason", "count"))


def _assert_refused(answer: Answer, status: int, reason: str) -> None:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers.get("Content-Type") == "application/json", answer.headers
    assert answer.json()["error"] == reason, answer.json()
    assert answer.json()["detail"]


# --- parse failures: a 400 with its reason -----------------------------------------------


def _deep_arrays(_: str) -> bytes:
    return b"[" * 100_000 + b"]" * 100_000  # the probe


def _deep_objects(_: str) -> bytes:
    return b'{"a":' * 100_000 + b"1" + b"}" * 100_000


def _deep_metadata(payout_id: str) -> bytes:
    # Parses (Python's limit is about 1 000 levels), but deeper than any Stripe event:
    # stored, it would break every later json.loads / json.dumps of it.
    return _compact(_event(payout_id, note=_nested(900)))


def _just_over_the_limit(payout_id: str) -> bytes:
    event = _event(payout_id, note=_nested(MAX_JSON_DEPTH - 4 + 1))  # event>data>object>metadata
    return _compact(event)


HOSTILE: list[Any] = [
    pytest.param(_deep_arrays, "too_deep", id="100000-nested-arrays"),
    pytest.param(_deep_objects, "too_deep", id="100000-nested-objects"),
    pytest.param(_deep_metadata, "too_deep", id="metadata-900-deep"),
    pytest.param(_just_over_the_limit, "too_deep", id="one-level-over-the-limit"),
    pytest.param(lambda p: b"[" * 50_000, "too_deep", id="unterminated-deep-arrays"),
    pytest.param(lambda p: json.dumps([_event(p)]).encode(), "not_an_event", id="json-array"),
    pytest.param(lambda p: b"12345", "not_an_event", id="json-number"),
    pytest.param(lambda p: b'"evt_123"', "not_an_event", id="json-string"),
    pytest.param(lambda p: b"null", "not_an_event", id="json-null"),
    pytest.param(lambda p: b"true", "not_an_event", id="json-true"),
    pytest.param(lambda p: b"", "invalid_json", id="empty"),
    pytest.param(lambda p: b'{"id": "evt_1", "object": "event", "x": NaN}', "invalid_json",
                 id="NaN"),
    pytest.param(lambda p: b'{"id": "evt_1", "object": "event", "x": -Infinity}',
                 "invalid_json", id="Infinity"),
    pytest.param(lambda p: b'{"id": "evt_1", "object": "event", "x": 1e999}', "invalid_json",
                 id="float-overflow"),
    pytest.param(lambda p: b'{"id": "evt_1", "x": ' + b"9" * 5000 + b"}", "invalid_json",
                 id="5000-digit-integer"),
    pytest.param(lambda p: b'{"id": "evt_1", "object": "event"', "invalid_json",
                 id="truncated"),
]


@pytest.mark.parametrize(("build", "reason"), HOSTILE)
def test_a_hostile_signed_body_is_a_400_with_its_reason(inline_server, build, reason):
    """Signed with our secret, so past the signature: the parse failure is its own 400."""
    payout = make_payout(status="in_transit")
    stored = _stored()

    answer = _send_signed(inline_server.url, build(payout.stripe_payout_id))

    _assert_refused(answer, 400, reason)
    assert _stored() == stored
    assert _rejections() == {reason: 1}


def test_an_event_nested_up_to_the_limit_is_stored_applied_and_readable(inline_server):
    """The deepest body accepted is stored, applied, and read back by everything that
    parses it again (processing, the console's event page) without a recursion error."""
    payout = make_payout(status="in_transit")
    note = _nested(MAX_JSON_DEPTH - 4)  # event > data > object > metadata > ... = the limit
    body = _compact(_event(payout.stripe_payout_id, note=note))

    answer = _send_signed(inline_server.url, body)

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False, "status": "processed"}
    event = WebhookEvent.objects.get()
    assert bytes(event.raw_body) == body
    assert json.loads(selectors.event_payload_pretty(event)) == json.loads(body)
    assert Payout.objects.get(pk=payout.pk).metadata == {"note": note}
    assert not _rejections()


# --- the signature's timestamp -----------------------------------------------------------


@pytest.mark.parametrize("ahead", [
    pytest.param(SIGNATURE_TOLERANCE_S + 5, id="305-s"),
    pytest.param(86_400, id="a-day"),
    pytest.param(10 * 365 * 86_400, id="ten-years"),
    pytest.param(10**12, id="after-year-9999"),
])
def test_a_signature_dated_in_the_future_is_refused(inline_server, ahead):
    """A signature more than 300 s ahead of our clock is a 400 future_timestamp."""
    payout = make_payout(status="in_transit")
    body = stripe_events.encode(_event(payout.stripe_payout_id))
    stored = _stored()

    answer = _send_signed(inline_server.url, body, timestamp=_now() + ahead)

    _assert_refused(answer, 400, "future_timestamp")
    assert _stored() == stored
    assert _rejections() == {"future_timestamp": 1}


def test_a_little_clock_skew_is_tolerated(inline_server):
    """A minute ahead (Stripe's clock a little fast) is accepted."""
    payout = make_payout(status="in_transit")
    body = stripe_events.encode(_event(payout.stripe_payout_id))

    answer = _send_signed(inline_server.url, body, timestamp=_now() + 60)

    assert answer.status == 200, answer.body
    assert WebhookEvent.objects.count() == 1


def test_a_future_timestamp_without_our_signature_is_a_bad_signature(inline_server):
    """Only a matching signature gets to the time: junk dated ahead is bad_signature, so
    nothing about the time check can be learned without the secret."""
    payout = make_payout(status="in_transit")
    body = stripe_events.encode(_event(payout.stripe_payout_id))

    answer = _send_signed(inline_server.url, body, secret=WRONG_SECRET,
                          timestamp=_now() + 86_400)

    _assert_refused(answer, 400, "bad_signature")
    assert _rejections() == {"bad_signature": 1}


# --- chunked bodies: read, or refused with a clear 4xx, never a bad signature ---------------


def _post_chunked(url: str, body: bytes, headers: dict[str, str], chunk: int = 1000) -> Answer:
    """POST ``body`` with Transfer-Encoding: chunked and no Content-Length."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", WEBHOOK_PATH,
                     body=(body[i:i + chunk] for i in range(0, len(body), chunk)),
                     headers={**headers, "Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = conn.getresponse()
        return Answer(response.status, response.read(), dict(response.getheaders()))
    finally:
        conn.close()


def test_a_signed_chunked_delivery_is_read_and_stored(inline_server):
    """A delivery without Content-Length, in 1 000-byte chunks, is stored as sent."""
    payout = make_payout(status="in_transit")
    event = _event(payout.stripe_payout_id)
    body = stripe_events.encode(event)
    assert len(body) > 1000  # more than one chunk

    answer = _post_chunked(inline_server.url, body, _headers(body))

    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False, "status": "processed"}
    stored = WebhookEvent.objects.get()
    assert (stored.stripe_event_id, bytes(stored.raw_body)) == (event["id"], body)
    assert not _rejections()


def test_a_chunked_body_over_one_mebibyte_is_a_413(inline_server):
    """Without a length to refuse up front, a chunked body is read up to 1 MiB + 1 byte."""
    payout = make_payout(status="in_transit")
    event = _event(payout.stripe_payout_id, padding="x" * MAX_BODY_BYTES)
    body = stripe_events.encode(event)

    answer = _post_chunked(inline_server.url, body, _headers(body), chunk=64 * 1024)

    _assert_refused(answer, 413, "too_large")
    assert not WebhookEvent.objects.exists()
    assert _rejections() == {"too_large": 1}


def test_a_chunked_body_of_exactly_one_mebibyte_is_accepted(inline_server):
    payout = make_payout(status="in_transit")
    event = _event(payout.stripe_payout_id, padding="")
    short = len(stripe_events.encode(event))
    event = _event(payout.stripe_payout_id, padding="x" * (MAX_BODY_BYTES - short))
    body = stripe_events.encode(event)
    assert len(body) == MAX_BODY_BYTES

    answer = _post_chunked(inline_server.url, body, _headers(body), chunk=100_000)

    assert answer.status == 200, answer.body
    assert bytes(WebhookEvent.objects.get().raw_body) == body


def test_a_chunked_body_with_broken_framing_is_a_4xx_not_a_bad_signature(inline_server):
    """A chunk size that is not hex, met while reading the body: 400 unreadable_body."""
    payout = make_payout(status="in_transit")
    body = stripe_events.encode(_event(payout.stripe_payout_id))
    head = (f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            f"Stripe-Signature: {stripe_events.sign(body, SECRET)}\r\n\r\n").encode()
    parts = urlsplit(inline_server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + b"10\r\n" + body[:16] + b"\r\nzz\r\n" + body[16:] + b"\r\n0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        status, data = response.status, response.read()

    assert status == 400, (status, data[:300])
    assert json.loads(data)["error"] == "unreadable_body"
    assert not WebhookEvent.objects.exists()
    assert _rejections() == {"unreadable_body": 1}


@pytest.fixture
def counting_at_once(settings: Any) -> Iterator[None]:
    settings.WEBHOOK_REJECTION_FLUSH_SECONDS = 0  # written in the test's transaction
    yield


def test_a_server_that_cannot_read_chunked_bodies_answers_411(counting_at_once):
    """Where the WSGI server does not end its input with the body (runserver, wsgiref),
    a chunked delivery is refused with 411 Length Required, not read as empty."""
    body = stripe_events.encode(_event(stripe_events.new_id("po")))
    request = RequestFactory().generic(
        "POST", WEBHOOK_PATH, body, content_type="application/json",
        HTTP_TRANSFER_ENCODING="chunked",
        HTTP_STRIPE_SIGNATURE=stripe_events.sign(body, SECRET))
    del request.META["CONTENT_LENGTH"]
    request.META.pop("wsgi.input_terminated", None)

    answer = stripe_webhook(request)

    assert answer.status_code == 411, answer.content
    assert json.loads(answer.content)["error"] == "length_required"
    assert _rejections() == {"length_required": 1}
