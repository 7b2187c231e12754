"""Sessions against a real server (gunicorn, DEBUG off): they end after 8 idle hours, and
an htmx request whose session ended sends the browser to the login page instead of
swapping the login page into the table."""

from __future__ import annotations

from datetime import datetime, timedelta
from urllib.parse import quote

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.utils import timezone

from tests.security.visitor import Visitor

pytestmark = pytest.mark.django_db(transaction=True)  # the server sees what tests write

PASSWORD = "correct horse battery staple"
EIGHT_HOURS = 8 * 3600


def signed_in(server) -> Visitor:  # type: ignore[no-untyped-def]
    User.objects.create_superuser("root", password=PASSWORD)
    visitor = Visitor(server.url)
    assert visitor.login("root", PASSWORD).status_code == 302
    return visitor


def session_row(visitor: Visitor) -> Session:
    return Session.objects.get(session_key=visitor.session.cookies["sessionid"])


def expires_in(visitor: Visitor, delta: timedelta) -> datetime:
    """Move the session's expiry as if it had been idle (8 h - delta) already."""
    at = timezone.now() + delta
    Session.objects.filter(session_key=visitor.session.cookies["sessionid"]).update(
        expire_date=at)
    return at


def about_eight_hours_from_now(moment: datetime) -> bool:
    return abs((moment - timezone.now()).total_seconds() - EIGHT_HOURS) < 120


def htmx(visitor: Visitor, path: str) -> dict[str, str]:
    return {"HX-Request": "true", "HX-Current-URL": visitor.base_url + path}


def test_the_settings():
    assert settings.SESSION_COOKIE_AGE == EIGHT_HOURS
    assert "console.middleware.IdleSessionExpiry" in settings.MIDDLEWARE
    middleware = settings.MIDDLEWARE
    assert (middleware.index("django.contrib.sessions.middleware.SessionMiddleware")
            < middleware.index("console.middleware.IdleSessionExpiry"))


def test_a_session_lasts_8_hours_from_the_last_request_of_its_person(inline_server):
    visitor = signed_in(inline_server)
    assert about_eight_hours_from_now(session_row(visitor).expire_date)

    # Idle for 7 h 59 min, then a request: 8 more hours, in the database and the cookie.
    expires_in(visitor, timedelta(minutes=1))
    response = visitor.get("/payouts/")
    assert response.status_code == 200
    assert about_eight_hours_from_now(session_row(visitor).expire_date)
    assert f"Max-Age={EIGHT_HOURS}" in response.headers["Set-Cookie"]

    # The Health page's automatic refresh is no sign of a person: it renews nothing.
    soon = expires_in(visitor, timedelta(minutes=1))
    poll = visitor.get("/health/", headers={**htmx(visitor, "/health/"),
                                            "X-Console-Poll": "true"})
    assert poll.status_code == 200
    assert session_row(visitor).expire_date == soon
    assert "sessionid" not in poll.headers.get("Set-Cookie", "")

    # Idle past 8 hours: signed out.
    expires_in(visitor, timedelta(seconds=-1))
    response = visitor.get("/payouts/")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login/?next=/payouts/"


def test_an_htmx_request_after_the_session_ended_sends_the_browser_to_login(inline_server):
    visitor = signed_in(inline_server)
    expires_in(visitor, timedelta(seconds=-1))

    # A filter change on the payouts list: not the login page swapped into #results, but
    # a whole-page visit to it, back to the page shown afterwards.
    shown = "/payouts/?status=failed"
    response = visitor.get("/payouts/?status=failed&page=2", headers=htmx(visitor, shown))
    assert response.status_code == 200
    assert response.headers["HX-Redirect"] == f"/login/?next={quote(shown, safe='')}"
    assert "Location" not in response.headers
    assert response.content == b""

    # A replay button on the events list (a POST, which login would not come back to).
    shown = "/events/?status=failed"
    response = visitor.post("/events/1/replay/", headers=htmx(visitor, shown))
    assert response.status_code == 200
    assert response.headers["HX-Redirect"] == f"/login/?next={quote(shown, safe='')}"

    # A current URL that is not this site's is not carried over.
    for elsewhere in ("https://evil.example/x", "//evil.example/x", "/\\evil.example/x"):
        response = visitor.get("/payouts/", headers={"HX-Request": "true",
                                                     "HX-Current-URL": elsewhere})
        assert response.headers["HX-Redirect"] == "/login/", elsewhere

    # Without htmx, the usual redirect.
    response = visitor.get("/payouts/")
    assert response.status_code == 302 and "HX-Redirect" not in response.headers

    # Logging in again lands on the page that was shown.
    response = visitor.post("/login/", {"username": "root", "password": PASSWORD,
                                        "next": shown})
    assert response.status_code == 302 and response.headers["Location"] == shown
