"""The pages that exist before the console: login, home, admin."""

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.http import HttpRequest
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_the_login_page_is_served(client):
    response = client.get(reverse("login"))
    assert response.status_code == 200
    assert b"Log in" in response.content
    assert b"csrfmiddlewaretoken" in response.content


def test_home_requires_login(client):
    response = client.get(reverse("home"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_staff_log_in_and_land_on_payouts(client):
    user = User.objects.create_user("support", password="correct horse battery")
    user.groups.add(Group.objects.get_or_create(name="Support")[0])
    user.groups.get().permissions.add(Permission.objects.get(codename="view_payout"))
    response = client.post(reverse("login"),
                           {"username": "support", "password": "correct horse battery"},
                           follow=True)
    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == reverse("payout-list")


def test_a_user_without_a_role_is_told_so(client):
    User.objects.create_user("newcomer", password="correct horse battery")
    # django-axes checks every login against its request (lockouts by address)
    client.login(request=HttpRequest(), username="newcomer", password="correct horse battery")
    response = client.get(reverse("home"))
    assert response.status_code == 200
    assert b"No access yet" in response.content


def test_wrong_password_is_refused(client):
    User.objects.create_user("support", password="correct horse battery")
    response = client.post(reverse("login"), {"username": "support", "password": "nope"})
    assert response.status_code == 200
    assert b"didn't match" in response.content
    assert "_auth_user_id" not in client.session


def test_admin_login_page_and_superuser_index(client):
    assert client.get("/admin/login/").status_code == 200
    admin = User.objects.create_superuser("admin", password="x" * 12)
    client.force_login(admin)
    assert client.get("/admin/").status_code == 200


def test_home_refuses_post(admin_client):
    assert admin_client.post(reverse("home")).status_code == 405


def test_static_files_are_served_without_collectstatic(client):
    response = client.get("/static/console/console.css")
    assert response.status_code == 200


def test_tests_run_on_their_own_database():
    from django.db import connection

    assert connection.settings_dict["NAME"].startswith("test_")
