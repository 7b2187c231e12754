"""Logins against a real server (gunicorn, DEBUG off): lockouts per username and address,
the lockout page, lifting a lockout in the admin, and the password rules.

The probe from the issue: "30 wrong passwords in a row are all accepted for trying; only
a minimum length is required of passwords".
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth import password_validation
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from tests.payouts.helpers import Server, server_env
from tests.security.visitor import Visitor

pytestmark = pytest.mark.django_db(transaction=True)  # the server sees what tests write

PASSWORD = "correct horse battery staple"
WRONG = "not the password at all"
LIMIT = 10  # AXES_FAILURE_LIMIT's default


@pytest.fixture(scope="module")
def proxied_server(test_database_url: str) -> Iterator[Server]:
    """The console behind one reverse proxy that appends the client's address to
    X-Forwarded-For (the tests send that header as the proxy would)."""
    server = Server(server_env(test_database_url, TRUSTED_PROXY_COUNT="1"),
                    workers=1, threads=4)
    yield server
    server.stop()


def user(username: str, **extra: object) -> User:
    return User.objects.create_user(username, password=PASSWORD, **extra)


def fail(visitor: Visitor, username: str, times: int) -> list[int]:
    return [visitor.login(username, WRONG).status_code for _ in range(times)]


def assert_locked(response, username: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 429
    assert "Login locked" in response.text
    assert f"Too many failed logins for <strong>{username}</strong>" in response.text
    assert "locked for 15 minutes" in response.text
    assert "ask an administrator to reset the lockout" in response.text


def test_settings_come_from_the_environment_with_the_issues_defaults():
    assert settings.AXES_FAILURE_LIMIT == LIMIT
    assert settings.AXES_COOLOFF_MINUTES == 15
    assert settings.AXES_LOCKOUT_PARAMETERS == [["username", "ip_address"]]
    assert settings.AXES_RESET_ON_SUCCESS is True
    assert settings.MIDDLEWARE[-1] == "axes.middleware.AxesMiddleware"
    assert settings.AUTHENTICATION_BACKENDS[0] == "axes.backends.AxesStandaloneBackend"


def test_the_tenth_failure_locks_the_username_from_that_address(inline_server):
    user("alice")
    user("bob")
    alice = Visitor(inline_server.url)

    statuses = fail(alice, "alice", LIMIT)
    assert statuses == [200] * (LIMIT - 1) + [429]
    assert "didn't match" in alice.login("bob", WRONG).text  # bob is only at one failure

    # The right password no longer helps, on the console's form or the admin's.
    right = alice.login("alice", PASSWORD)
    assert_locked(right, "alice")
    assert not alice.signed_in
    assert alice.login("alice", PASSWORD, path="/admin/login/").status_code == 429
    # Nor does claiming another address: without a proxy, X-Forwarded-For is ignored.
    spoofed = alice.login("alice", PASSWORD, headers={"X-Forwarded-For": "203.0.113.50"})
    assert spoofed.status_code == 429
    # The 30 tries of the issue's probe: all refused from the 10th on, none counted again.
    assert set(fail(alice, "alice", 30 - LIMIT - 3)) == {429}
    attempt = AccessAttempt.objects.get(username="alice")
    assert attempt.failures_since_start == LIMIT
    assert attempt.ip_address == "127.0.0.1"

    # Another username from the same address still logs in.
    other = Visitor(inline_server.url)
    response = other.login("bob", PASSWORD)
    assert response.status_code == 302 and other.signed_in


def test_the_lockout_ends_15_minutes_after_the_tenth_failure(inline_server):
    user("carol")
    visitor = Visitor(inline_server.url)
    fail(visitor, "carol", LIMIT)

    def minutes_ago(minutes: int) -> None:
        AccessAttempt.objects.filter(username="carol").update(
            attempt_time=timezone.now() - timedelta(minutes=minutes))

    minutes_ago(14)
    assert visitor.login("carol", PASSWORD).status_code == 429
    assert AccessAttempt.objects.get(username="carol").failures_since_start == LIMIT
    minutes_ago(16)
    assert visitor.login("carol", PASSWORD).status_code == 302
    assert visitor.signed_in
    assert not AccessAttempt.objects.filter(username="carol").exists()  # reset on success


def test_a_success_resets_the_count(inline_server):
    user("dave")
    visitor = Visitor(inline_server.url)
    assert set(fail(visitor, "dave", LIMIT - 1)) == {200}
    assert visitor.login("dave", PASSWORD).status_code == 302
    assert set(fail(Visitor(inline_server.url), "dave", LIMIT - 1)) == {200}  # not locked


def test_an_admin_sees_the_lockout_and_lifts_it_in_the_admin(inline_server):
    user("erin")
    user("root", is_staff=True, is_superuser=True)
    locked = Visitor(inline_server.url)
    fail(locked, "erin", LIMIT)
    assert locked.login("erin", PASSWORD).status_code == 429

    admin = Visitor(inline_server.url)  # the same address: another username logs in
    assert admin.login("root", PASSWORD, path="/admin/login/").status_code == 302
    listing = admin.get("/admin/axes/accessattempt/?locked_out=yes")
    assert listing.status_code == 200
    assert "erin" in listing.text and "Locked Out" in listing.text
    attempt = AccessAttempt.objects.get(username="erin")
    reset = admin.post("/admin/axes/accessattempt/", {
        "action": "delete_selected", "_selected_action": [attempt.pk], "post": "yes"})
    assert reset.status_code == 302
    assert not AccessAttempt.objects.filter(username="erin").exists()

    response = locked.login("erin", PASSWORD)
    assert response.status_code == 302 and locked.signed_in


def test_behind_a_proxy_the_clients_address_counts(proxied_server):
    user("frank")
    at_home = {"X-Forwarded-For": "198.51.100.7"}
    visitor = Visitor(proxied_server.url, headers=at_home)
    assert fail(visitor, "frank", LIMIT)[-1] == 429
    assert AccessAttempt.objects.get(username="frank").ip_address == "198.51.100.7"

    # A client cannot pick its address: what it puts before the proxy's entry is ignored.
    forged = Visitor(proxied_server.url, headers={"X-Forwarded-For": "192.0.2.1, 198.51.100.7"})
    assert forged.login("frank", PASSWORD).status_code == 429
    # The same username from another address logs in.
    office = Visitor(proxied_server.url, headers={"X-Forwarded-For": "198.51.100.8"})
    response = office.login("frank", PASSWORD)
    assert response.status_code == 302 and office.signed_in


# --- password rules ------------------------------------------------------------------------


def test_djangos_four_password_validators_are_on():
    names = [v["NAME"].rsplit(".", 1)[1] for v in settings.AUTH_PASSWORD_VALIDATORS]
    assert names == ["UserAttributeSimilarityValidator", "MinimumLengthValidator",
                     "CommonPasswordValidator", "NumericPasswordValidator"]


@pytest.mark.parametrize(("password", "why"), [
    ("password", "too common"),
    ("12345678", "entirely numeric"),
    ("84736251", "entirely numeric"),
    ("short", "too short"),
    ("payoutsupport1", "too similar to the username"),
])
def test_weak_passwords_are_refused(password, why):
    someone = User(username="payoutsupport", email="support@example.com")
    with pytest.raises(ValidationError) as refused:
        password_validation.validate_password(password, someone)
    assert why in " ".join(refused.value.messages)


def test_a_good_password_passes():
    password_validation.validate_password(PASSWORD, User(username="payoutsupport"))


def test_the_admin_refuses_a_weak_password_for_a_new_or_existing_user():
    root = User.objects.create_superuser("root", password=PASSWORD)
    client = Client()
    client.force_login(root)
    response = client.post("/admin/auth/user/add/", {
        "username": "newstaff", "password1": "password", "password2": "password",
        "usable_password": "true"})
    assert response.status_code == 200
    assert "too common" in response.content.decode()
    assert not User.objects.filter(username="newstaff").exists()

    staff = User.objects.create_user("oldstaff", password=PASSWORD)
    response = client.post(f"/admin/auth/user/{staff.pk}/password/", {
        "password1": "12345678", "password2": "12345678"})
    assert response.status_code == 200
    assert "entirely numeric" in response.content.decode()
    staff.refresh_from_db()
    assert staff.check_password(PASSWORD)


def test_a_forwarded_address_that_is_not_an_address_counts_against_the_peer(settings):
    from django.test import RequestFactory

    from console.logins import client_ip

    settings.TRUSTED_PROXY_COUNT = 1
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.5",
                                   HTTP_X_FORWARDED_FOR="198.51.100.7")
    assert client_ip(request) == "198.51.100.7"
    for junk in ("unknown", "198.51.100.7:5678", "not an address"):
        request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR=junk)
        assert client_ip(request) == "10.0.0.5"
