"""Sessions of the console: idle expiry, and what htmx does once one has expired."""

from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import resolve_url
from django.utils.http import url_has_allowed_host_and_scheme
from django_htmx.http import HttpResponseClientRedirect

POLL_HEADER = "X-Console-Poll"  # set by the Health page's automatic refresh (hx-headers)


class IdleSessionExpiry:
    """A signed-in session ends after SESSION_COOKIE_AGE (8 h) without a request from its
    person: each of their requests saves the session again, which pushes its expiry (the
    cookie's and the database row's) that far ahead. The Health page's automatic refresh
    is no sign of a person and does not keep a session alive.

    Like SESSION_SAVE_EVERY_REQUEST (one UPDATE of the session row per request), but only
    for signed-in people and not for polls. Webhooks never reach it (WebhookFastPath)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        user = getattr(request, "user", None)
        if (user is not None and user.is_authenticated
                and POLL_HEADER not in request.headers and not request.session.is_empty()):
            request.session.modified = True  # SessionMiddleware saves it, expiry renewed
        return response


class HtmxLoginRedirect:
    """An htmx request whose session has expired gets login_required's redirect to the
    login page; the browser would follow it and htmx swap the login page into a table
    row. Instead the answer tells htmx to load the login page as a whole page
    (HX-Redirect), with ``next`` the page the browser shows (HX-Current-URL), so the
    person lands back there after logging in."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (request.headers.get("HX-Request") == "true"
                and response.status_code in (301, 302, 303, 307, 308)
                and self._is_login(response.get("Location", ""))):
            login = resolve_url(settings.LOGIN_URL)
            current = getattr(getattr(request, "htmx", None), "current_url_abs_path", None)
            if current and url_has_allowed_host_and_scheme(
                    current, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
                login = f"{login}?{urlencode({'next': current})}"
            return HttpResponseClientRedirect(login)
        return response

    @staticmethod
    def _is_login(location: str) -> bool:
        return urlsplit(location).path == resolve_url(settings.LOGIN_URL)
