"""Talking to Stripe's API: one client for writes, and reads that are retried.

Writes (transfers, payouts, reversals) are never retried behind the caller's back:
the next run is the retry, visible and with the same idempotency keys
(``payouts.services.seller_payouts``).

Reads (``StripeReader``) are safe to repeat, so a 429, a 5xx, a network error, a
timeout or an answer that is not JSON is tried again with exponential backoff and
jitter, unless Stripe says ``Stripe-Should-Retry: false``; at most
``STRIPE_READ_ATTEMPTS`` tries and ``STRIPE_READ_DEADLINE_SECONDS`` in all. Errors are
``StripeReadError``s: a 401 is never retried and raises ``StripeKeyRefused``, which
names ``STRIPE_API_KEY``; a 404 raises ``StripeMissing``, another final 4xx (403: no
access to that connected account) ``StripeRefused``, and retries that ran out
``StripeUnavailable``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import stripe
import structlog
from django.conf import settings

log = structlog.get_logger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
PAGE_SIZE = 100  # the most Stripe lists in one page
# Stripe's words when the key is good but the connected account is gone or disconnected.
NO_ACCESS = "does not have access to account"


class StripeNotConfigured(Exception):
    pass


class StripeReadError(Exception):
    """A read that did not get an answer to use; the message says why."""


class StripeKeyRefused(StripeReadError):
    """Stripe answered 401: the key is wrong, revoked or for another account."""


class StripeMissing(StripeReadError):
    """Stripe does not know the object (404 ``resource_missing``)."""


class StripeRefused(StripeReadError):
    """Stripe refused this request for good, e.g. 403: the key has no access to the
    connected account (disconnected, deleted)."""


class StripeUnavailable(StripeReadError):
    """A read still failed after its retries (or Stripe said not to retry)."""


def stripe_client(*, timeout_s: float | None = None) -> stripe.StripeClient:
    key = settings.STRIPE_API_KEY
    if not key:
        raise StripeNotConfigured(
            "STRIPE_API_KEY is not set: this needs the platform's Stripe secret key "
            "(sk_live_… or sk_test_…); STRIPE_API_BASE may point at another API host."
        )
    if key.startswith(("sk_live_", "rk_live_", "sk_test_", "rk_test_")) and (
            "_live_" in key) != settings.STRIPE_LIVEMODE:
        mode = "live" if settings.STRIPE_LIVEMODE else "test"
        raise StripeNotConfigured(f"STRIPE_API_KEY is not a {mode}-mode key, but "
                                  f"STRIPE_LIVEMODE says this is a {mode} deployment")
    return stripe.StripeClient(
        key, base_addresses={"api": settings.STRIPE_API_BASE},
        # Writes: the next run is the retry, with the same keys. Reads: StripeReader's loop.
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout_s or settings.STRIPE_TIMEOUT_SECONDS))


@dataclass(frozen=True)
class Answer:
    """A successful read: the JSON exactly as Stripe sent it, and when Stripe sent it."""

    data: dict[str, Any]
    request_id: str
    stripe_time: datetime  # Stripe's ``Date`` header (its clock), else ours


def _header(headers: Any, name: str) -> str:
    if not headers:
        return ""
    for key, value in headers.items():
        if key.lower() == name:
            return str(value)
    return ""


def _stripe_time(headers: Any) -> datetime:
    try:
        return parsedate_to_datetime(_header(headers, "date")).astimezone(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)


def _retryable(exc: stripe.StripeError) -> bool:
    should = _header(exc.headers, "stripe-should-retry")
    if should in ("true", "false"):
        return should == "true"
    if isinstance(exc, stripe.APIConnectionError):  # network error or timeout
        return True
    status = exc.http_status or 0
    # 200 here: the answer was not JSON (a proxy's page, a cut-off body).
    return status in (200, 409, 429) or status >= 500


class StripeReader:
    """GET requests to Stripe, retried as the module says. ``attempts`` and ``deadline_s``
    override the settings (a caller that must answer soon); ``sleep`` is for tests."""

    def __init__(self, client: stripe.StripeClient | None = None, *,
                 attempts: int | None = None, deadline_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client or stripe_client()
        self.attempts = max(1, attempts or int(settings.STRIPE_READ_ATTEMPTS))
        self.deadline_s = deadline_s or float(settings.STRIPE_READ_DEADLINE_SECONDS)
        self.sleep = sleep
        self.requests = 0  # sent, retries included

    def get(self, path: str, params: dict[str, Any] | None = None, *,
            account: str = "") -> Answer:
        options = {"stripe_account": account} if account else {}
        attempts = self.attempts
        deadline = time.monotonic() + self.deadline_s
        for attempt in range(1, attempts + 1):
            self.requests += 1
            try:
                response = self.client.raw_request("get", path, **(params or {}), **options)
                return Answer(response.data, _header(response.headers, "request-id"),
                              _stripe_time(response.headers))
            except stripe.AuthenticationError as exc:
                if account and NO_ACCESS in str(exc.user_message or exc):
                    # The key is fine; it has no access to that connected account any more.
                    raise StripeRefused(f"GET {path} on {account}: HTTP 401 "
                                        f"{exc.user_message or exc}") from exc
                raise StripeKeyRefused(
                    f"Stripe refused STRIPE_API_KEY (HTTP 401, request "
                    f"{exc.request_id or '?'}): {exc.user_message or exc}. Set STRIPE_API_KEY "
                    "to the platform's secret key for this Stripe account.") from exc
            except stripe.StripeError as exc:
                if exc.http_status == 404 and exc.code == "resource_missing":
                    raise StripeMissing(f"{path}: {exc.user_message or exc}") from exc
                delay = self._backoff(attempt, exc)
                log.warning("stripe.read_failed", path=path, account=account or None,
                            status=exc.http_status, request_id=exc.request_id,
                            attempt=attempt, error=str(exc)[:200],
                            retry_in_s=None if delay is None else round(delay, 2))
                if (delay is None or attempt == attempts
                        or time.monotonic() + delay > deadline):
                    status = exc.http_status or 0
                    error = StripeRefused if 400 <= status < 500 and delay is None \
                        else StripeUnavailable
                    raise error(
                        f"GET {path}{' on ' + account if account else ''} failed after "
                        f"{attempt} attempt(s): HTTP {status or 'none'} "
                        f"{exc.user_message or exc} (request {exc.request_id or '?'})") from exc
                self.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _backoff(attempt: int, exc: stripe.StripeError) -> float | None:
        """Seconds before the next try, or None when this error is not worth one."""
        if not _retryable(exc):
            return None
        ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
        retry_after = _header(exc.headers, "retry-after")
        wait = float(retry_after) if retry_after.isdigit() else 0.0
        return max(wait, ceiling / 2 + random.uniform(0, ceiling / 2))

    def list_all(self, path: str, params: dict[str, Any], *,
                 account: str = "") -> Iterator[tuple[dict[str, Any], Answer]]:
        """Every object of a Stripe list, page by page (``starting_after``), newest first;
        each with the answer of its page."""
        after = ""
        while True:
            page = self.get(path, {**params, "limit": PAGE_SIZE,
                                   **({"starting_after": after} if after else {})},
                            account=account)
            objects = page.data.get("data") or []
            for each in objects:
                yield each, page
            if not page.data.get("has_more") or not objects:
                return
            after = objects[-1]["id"]
