"""Logins: whose address a failure counts against, and what a locked-out person sees.

django-axes counts failed logins per username and address (settings at the end of
``console/settings.py``); these two callables are its ``AXES_CLIENT_IP_CALLABLE`` and
``AXES_LOCKOUT_CALLABLE``.
"""

import ipaddress
from typing import Any

import structlog
from axes.helpers import get_cool_off
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

log = structlog.get_logger(__name__)


def client_ip(request: HttpRequest) -> str | None:
    """The client's address. Without a proxy (``TRUSTED_PROXY_COUNT=0``), the peer of the TCP
    connection: an X-Forwarded-For header is the client's own word and is ignored. Behind
    N reverse proxies that each append the address they saw, the client is the N-th
    address from the right of X-Forwarded-For (what a client put in front of it is
    ignored); a request that came round the proxies (fewer addresses) counts against its
    peer address."""
    remote = request.META.get("REMOTE_ADDR")
    count = settings.TRUSTED_PROXY_COUNT
    if count <= 0:
        return remote
    forwarded = [part.strip() for part in
                 request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
    if len(forwarded) < count:
        return remote
    try:  # a proxy's "unknown" or "host:port" would not fit axes' address column
        return str(ipaddress.ip_address(forwarded[-count]))
    except ValueError:
        log.warning("console.forwarded_address_unreadable", value=forwarded[-count][:64])
        return remote


def lockout_response(request: HttpRequest, original_response: HttpResponse | None = None,
                     credentials: dict[str, Any] | None = None) -> HttpResponse:
    """429 with the login page's look: locked, for how long, and who can lift it."""
    cool_off = get_cool_off(request)
    minutes = round(cool_off.total_seconds() / 60) if cool_off else 0
    username = (credentials or {}).get("username") or request.POST.get("username", "")
    log.warning("console.login_locked_out", username=username,
                address=getattr(request, "axes_ip_address", None))
    return render(request, "registration/locked_out.html", {
        "minutes": minutes,
        "failure_limit": settings.AXES_FAILURE_LIMIT,
        "username": username,
    }, status=429)
