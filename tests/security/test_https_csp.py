"""HTTPS and the Content-Security-Policy over HTTP, against a real gunicorn with the
production settings (DEBUG off, DJANGO_HTTPS on by default). The server sits as behind a
TLS-terminating proxy (DJANGO_SECURE_PROXY_SSL_HEADER): a request with
``X-Forwarded-Proto: https`` came over HTTPS, one without over plain HTTP."""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import User

from tests.payouts.helpers import Server, server_env

HTTPS = {"X-Forwarded-Proto": "https"}
PASSWORD = "a-long-test-password-for-https"
EXPECTED_CSP = {
    "default-src": "'self'", "base-uri": "'self'", "form-action": "'self'",
    "frame-ancestors": "'none'", "object-src": "'none'",
}


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: str

    def cookie(self, name: str) -> str:
        """The Set-Cookie header that sets ``name``."""
        found = [c for c in self.headers.get_all("Set-Cookie") or [] if c.startswith(f"{name}=")]
        assert found, f"no {name} cookie set: {self.headers.get_all('Set-Cookie')}"
        return found[0]

    def csp(self) -> dict[str, str]:
        header = self.headers.get("Content-Security-Policy")
        assert header, "no Content-Security-Policy header"
        return dict(part.strip().split(" ", 1) for part in header.split(";") if part.strip())


@pytest.fixture(scope="module")
def https_server(test_database_url: str) -> Iterator[Server]:
    server = Server(server_env(test_database_url, DJANGO_HTTPS="true",
                               DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https"),
                    workers=1, threads=4)
    yield server
    server.stop()


def get(server: Server, path: str, headers: dict[str, str] | None = None,
        method: str = "GET", body: str | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return Response(answer.status, answer.headers, answer.read().decode())
    finally:
        conn.close()


def test_plain_http_is_redirected_to_https(https_server):
    for path in ["/login/", "/payouts/?status=failed", "/admin/login/"]:
        answer = get(https_server, path)
        assert answer.status == 301, path
        assert answer.headers["Location"] == f"https://127.0.0.1:{https_server.port}{path}"


def test_https_answers_carry_hsts_csp_and_a_secure_csrf_cookie(https_server):
    answer = get(https_server, "/login/", HTTPS)
    assert answer.status == 200
    assert answer.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    assert answer.csp() == EXPECTED_CSP
    csrf = answer.cookie("csrftoken")
    assert "; Secure" in csrf and "SameSite=Lax" in csrf
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_the_webhook_is_reached_over_https_and_redirected_over_http(https_server):
    # Stripe delivers only over HTTPS: in production the redirect never meets a delivery.
    over_https = get(https_server, "/webhooks/stripe/", HTTPS, method="POST", body="{}")
    assert over_https.status == 400  # the view's answer: unsigned
    assert get(https_server, "/webhooks/stripe/", method="POST", body="{}").status == 301


@pytest.mark.django_db(transaction=True)
def test_after_login_the_session_cookie_is_secure_and_every_page_has_the_csp(https_server):
    User.objects.create_superuser("sec-admin", "sec@example.com", PASSWORD)
    origin = f"https://127.0.0.1:{https_server.port}"
    form = get(https_server, "/login/", HTTPS)
    csrf_cookie = SimpleCookie(form.cookie("csrftoken"))["csrftoken"].value
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.body)
    assert token, form.body
    logged_in = get(https_server, "/login/", {
        **HTTPS, "Origin": origin, "Referer": f"{origin}/login/",
        "Cookie": f"csrftoken={csrf_cookie}",
        "Content-Type": "application/x-www-form-urlencoded",
    }, method="POST", body=urlencode({"username": "sec-admin", "password": PASSWORD,
                                      "csrfmiddlewaretoken": token.group(1)}))
    assert logged_in.status == 302, logged_in.body[:500]
    session = logged_in.cookie("sessionid")
    assert "; Secure" in session and "; HttpOnly" in session
    cookies = {"Cookie": f"csrftoken={csrf_cookie}; "
                         f"sessionid={SimpleCookie(session)['sessionid'].value}"}
    for path in ["/payouts/", "/events/", "/health/", "/reconciliation/", "/admin/",
                 "/admin/payouts/webhookevent/"]:
        page = get(https_server, path, {**HTTPS, **cookies})
        assert page.status == 200, (path, page.status)
        assert page.csp() == EXPECTED_CSP, path
    admin_login = get(https_server, "/admin/login/", HTTPS)
    assert admin_login.status == 200 and admin_login.csp() == EXPECTED_CSP
