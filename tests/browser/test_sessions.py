"""An expired session in a real browser: an htmx filter change loads the login page as
the whole page (not into the table), and logging in comes back to the list."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.contrib.sessions.models import Session
from playwright.sync_api import Page, expect

from payouts.roles import ensure_roles
from tests.browser.conftest import login

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct horse battery staple"


def test_an_htmx_request_after_the_session_expired_goes_to_the_login_page(page: Page):
    ensure_roles(Group, Permission)
    User.objects.create_user("sam", password=PASSWORD).groups.add(
        Group.objects.get(name="Support"))
    login(page, "sam", PASSWORD)
    page.goto("/payouts/")
    expect(page.locator("#results .count")).to_have_text("0 payouts")

    Session.objects.all().delete()  # as if 8 idle hours had passed
    page.get_by_label("Status").select_option("failed")  # an htmx GET of #results

    expect(page).to_have_url(re.compile(r"/login/\?next=%2Fpayouts%2F$"))
    expect(page.get_by_role("heading", name="Log in")).to_have_count(1)
    expect(page.locator("#results")).to_have_count(0)  # no table with a login page in it

    page.get_by_label("Username").fill("sam")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/payouts/$"))
    expect(page.locator("#results .count")).to_have_text("0 payouts")
