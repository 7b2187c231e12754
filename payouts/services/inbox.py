"""The webhook inbox: verify a delivery, store it once, count what is refused.

Nothing here parses more than it must or writes anything for a delivery that
is not signed with one of our secrets (beyond one counter per refusal reason).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
import structlog
from django.db import connection

from payouts.models import WebhookEvent, WebhookRejection

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024
SIGNATURE_TOLERANCE_S = 300

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
    try:
        payload = json.loads(text)
    except ValueError:
        raise Rejected("invalid_json", "the body is not JSON") from None
    problem = _event_shape_problem(payload)
    if problem:
        raise Rejected("not_an_event", problem)
    return payload  # type: ignore[no-any-return]


def _check_signature(text: str, header: str, secrets: list[str]) -> None:
    messages = []
    for secret in secrets:  # several while a secret is being rolled
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, SIGNATURE_TOLERANCE_S)
            return
        except stripe.SignatureVerificationError as exc:
            messages.append(str(exc))
    # stripe-python checks the timestamp only once a signature matched.
    if any("tolerance" in m for m in messages):
        raise Rejected("stale_timestamp", "the signature timestamp is older than 300 s")
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


def _event_shape_problem(payload: Any) -> str | None:
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


@dataclass(frozen=True)
class Recorded:
    event_id: int | None  # our primary key; None for a duplicate
    duplicate: bool


def event_record(payload: dict[str, Any], body: bytes, headers: dict[str, str], *,
                 lease_s: float) -> Recorded:
    """Store a verified event once (its id is unique); a duplicate changes nothing.

    ``lease_s`` > 0 keeps workers off the event for that long, because the
    caller processes it right away (inline mode).
    """
    obj = payload["data"]["object"]
    created = datetime.fromtimestamp(payload["created"], tz=UTC)
    due = datetime.now(UTC) + timedelta(seconds=lease_s)
    with connection.cursor() as cursor:
        # One statement: concurrent duplicates cannot both insert, and none overwrites.
        cursor.execute(
            f"""
            INSERT INTO {WebhookEvent._meta.db_table}
                (stripe_event_id, type, account, livemode, api_version, stripe_created,
                 stripe_object_id, raw_body, headers, received_at, status, status_reason,
                 attempts, next_attempt_at, last_error)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now(), 'received', '', %s, %s, '')
            ON CONFLICT (stripe_event_id) DO NOTHING
            RETURNING id
            """,
            [payload["id"], payload["type"], payload.get("account") or "",
             bool(payload.get("livemode", False)), payload.get("api_version") or "", created,
             obj.get("id") or "", body, json.dumps(headers),
             1 if lease_s > 0 else 0, due],
        )
        row = cursor.fetchone()
    if row is None:
        return Recorded(event_id=None, duplicate=True)
    return Recorded(event_id=row[0], duplicate=False)


def is_stored(stripe_event_id: str) -> bool:
    """Whether an event with this id is in the inbox already (a duplicate delivery)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT 1 FROM {WebhookEvent._meta.db_table} WHERE stripe_event_id = %s",
                       [stripe_event_id])
        return cursor.fetchone() is not None


def rejection_count(reason: str) -> None:
    """Count a refused delivery: one row per reason, updated in place."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {WebhookRejection._meta.db_table} (reason, count, last_seen_at)
            VALUES (%s, 1, now())
            ON CONFLICT (reason) DO UPDATE
            SET count = {WebhookRejection._meta.db_table}.count + 1, last_seen_at = now()
            """,
            [reason],
        )
