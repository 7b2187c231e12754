"""Realistic Stripe payout events, signed like Stripe signs them.

Used by ``stripe_trigger`` (demos), ``seed_demo``, the benchmarks and the tests;
shaped after the payout fixture of Stripe's OpenAPI description (docs/design.md
lists the fields we rely on). Kept free of Django, so the load generator can use it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

import stripe

API_VERSION = "2025-09-30.clover"
PAYOUT_EVENT_TYPES = ("payout.created", "payout.updated", "payout.paid", "payout.failed",
                      "payout.canceled", "payout.reconciliation_completed")
# The status a payout usually has in an event of each type (for demos and load; what
# the processor makes of an event is decided in payouts/transitions.py).
TYPICAL_STATUS = {"payout.created": "pending", "payout.updated": "in_transit",
                  "payout.paid": "paid", "payout.failed": "failed", "payout.canceled": "canceled",
                  "payout.reconciliation_completed": "paid"}
DAY = 86400


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def derived_id(prefix: str, *parts: str) -> str:
    """A stable id for an object that belongs to another (same input, same id)."""
    return f"{prefix}_{hashlib.sha256(':'.join(parts).encode()).hexdigest()[:24]}"


def payout_object(
    payout_id: str,
    *,
    status: str,
    amount: int = 1100,
    currency: str = "usd",
    created: int | None = None,
    arrival_date: int | None = None,
    failure_code: str | None = None,
    failure_message: str | None = None,
    metadata: dict[str, str] | None = None,
    livemode: bool = False,
    original_payout: str | None = None,
    reversed_by: str | None = None,
) -> dict[str, Any]:
    """A payout object; with ``original_payout``, a reversal (give it a negative amount)."""
    created = created if created is not None else int(time.time())
    failed = status in ("failed", "canceled")
    return {
        "id": payout_id,
        "object": "payout",
        "amount": amount,
        "application_fee": None,
        "application_fee_amount": None,
        "arrival_date": arrival_date if arrival_date is not None else created + 2 * DAY,
        "automatic": True,
        "balance_transaction": derived_id("txn", payout_id),
        "created": created,
        "currency": currency,
        "description": "STRIPE PAYOUT",
        "destination": derived_id("ba", payout_id),
        "failure_balance_transaction": derived_id("txn", payout_id, status) if failed else None,
        "failure_code": failure_code if status == "failed" else None,
        "failure_message": failure_message if status == "failed" else None,
        "livemode": livemode,
        "metadata": metadata or {},
        "method": "standard",
        "original_payout": original_payout,
        "payout_method": None,
        "reconciliation_status": "completed" if status == "paid" else "in_progress",
        "reversed_by": reversed_by,
        "source_type": "card",
        "statement_descriptor": None,
        "status": status,
        "trace_id": {"status": "pending", "value": None},
        "type": "bank_account",
    }


def payout_event(
    event_type: str,
    payout: dict[str, Any],
    *,
    account: str | None = None,
    created: int | None = None,
    event_id: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": payout}
    if event_type == "payout.updated":
        data["previous_attributes"] = previous_attributes or {"status": "pending"}
    event: dict[str, Any] = {
        "id": event_id or new_id("evt"),
        "object": "event",
        "api_version": API_VERSION,
        "created": created if created is not None else int(time.time()),
        "data": data,
        "livemode": payout.get("livemode", False),
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }
    if account:
        event["account"] = account
    return event


def failed_payout_defaults() -> dict[str, str]:
    return {"failure_code": "account_closed",
            "failure_message": "The bank account has been closed."}


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, indent=2).encode()


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header Stripe would send for ``body``."""
    return str(stripe.WebhookSignature.generate_signature_header(
        body.decode("utf-8"), secret, timestamp=timestamp))
