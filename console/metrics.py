"""GET /metrics: Prometheus's text format (payouts/metrics.py), for a bearer token only.

Answered by ``MetricsEndpoint`` ahead of the console's middleware, like the webhook:
no session is read or saved, no login, no CSRF, no lockout counting. Without
``METRICS_TOKEN`` the page does not exist (404); a missing or wrong token is a 401 that
says what is expected. The token is compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import structlog
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from prometheus_client import CONTENT_TYPE_LATEST

from payouts import metrics

log = structlog.get_logger(__name__)


def _text(status: int, message: str) -> HttpResponse:
    return HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")


def _bearer(request: HttpRequest) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def metrics_view(request: HttpRequest) -> HttpResponse:
    expected = settings.METRICS_TOKEN
    if not expected:
        return _text(404, "Not found: /metrics is off (METRICS_TOKEN is not set).")
    if request.method not in ("GET", "HEAD"):
        response = _text(405, "Use GET.")
        response["Allow"] = "GET, HEAD"
        return response
    given = _bearer(request)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        log.warning("metrics.refused", remote_addr=request.META.get("REMOTE_ADDR"),
                    token_given=given is not None)
        response = _text(401, "Unauthorized: send the header `Authorization: Bearer <token>` "
                              "with the value of METRICS_TOKEN." if given is None else
                              "Unauthorized: the bearer token is not METRICS_TOKEN.")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


class MetricsEndpoint:
    """Hands GET /metrics to ``metrics_view`` past the console's middleware (sessions,
    auth, CSRF, axes), none of which a scraper uses. After SecurityMiddleware, so HTTPS
    redirects still apply."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.path: str | None = None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if self.path is None:
            self.path = reverse("metrics")
        if request.path == self.path:
            return metrics_view(request)
        return self.get_response(request)
