"""The production settings fail closed (DEBUG off), checked in fresh processes with a
controlled environment: nothing from the test run, nothing from a checkout's `.env`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import TEST_SECRET_KEY

REPO = Path(__file__).resolve().parents[2]
# A PostgreSQL nobody serves: these processes must never need to connect.
NOWHERE_DB = "postgresql://payouts@127.0.0.1:9/payouts"
REQUIRED = {"DJANGO_SECRET_KEY": TEST_SECRET_KEY, "DATABASE_URL": NOWHERE_DB}
DEV_WEBHOOK_SECRET = "whsec_dev_only_payout_console_not_a_real_secret"


def bare_env(**env: str) -> dict[str, str]:
    """Only what a process needs to run Python, then ``env``; never a .env file."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
            "DJANGO_SETTINGS_MODULE": "console.settings", "DJANGO_ENV_FILE": "",
            "LOG_LEVEL": "WARNING", **env}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def settings_of(*names: str, **env: str) -> dict[str, object]:
    """The named settings as a process started with ``env`` sees them."""
    script = ("import django, json; django.setup(); from django.conf import settings; "
              f"print(json.dumps({{n: getattr(settings, n) for n in {list(names)!r}}}, "
              "default=str))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=bare_env(**env),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def refusal(**env: str) -> str:
    """What a process started with ``env`` says when the settings refuse to load."""
    result = manage("check", env=bare_env(**env))
    assert result.returncode != 0, f"started:\n{result.stdout}{result.stderr}"
    refused = [line for line in result.stderr.splitlines()
               if line.startswith("django.core.exceptions.ImproperlyConfigured: ")]
    assert refused, result.stderr
    return refused[-1]


# --- DJANGO_SECRET_KEY --------------------------------------------------------------------


def test_without_a_secret_key_and_debug_off_it_refuses_to_start_naming_it():
    message = refusal(DATABASE_URL=NOWHERE_DB)
    assert "DJANGO_SECRET_KEY is not set" in message


def test_debug_on_keeps_the_development_key():
    seen = settings_of("SECRET_KEY", DJANGO_DEBUG="true", DATABASE_URL=NOWHERE_DB)
    assert str(seen["SECRET_KEY"]).startswith("django-insecure-dev-only")


# --- DATABASE_URL: the embedded server only when asked for --------------------------------


@pytest.mark.parametrize("debug", ["false", "true"])
def test_without_database_url_it_refuses_and_starts_no_database(debug, tmp_path):
    var = tmp_path / "var"
    result = manage("migrate", "--noinput", env=bare_env(
        DJANGO_DEBUG=debug, DJANGO_SECRET_KEY=TEST_SECRET_KEY, EMBEDDED_PG_DIR=str(var)))
    assert result.returncode != 0
    assert "ImproperlyConfigured: DATABASE_URL is not set" in result.stderr, result.stderr
    assert not var.exists(), "an embedded database was started without being asked for"


@pytest.mark.parametrize(("url", "engine"), [
    ("embedded", "console.db_backend"),
    (NOWHERE_DB, "django.db.backends.postgresql"),
])
def test_the_embedded_database_is_used_only_when_asked_for(url, engine):
    seen = settings_of("DATABASES", DJANGO_SECRET_KEY=TEST_SECRET_KEY, DATABASE_URL=url)
    assert seen["DATABASES"]["default"]["ENGINE"] == engine  # type: ignore[index]


# --- the public development webhook secret on a live deployment -----------------------------


@pytest.mark.parametrize("env", [
    {"STRIPE_WEBHOOK_SECRET": DEV_WEBHOOK_SECRET},
    {"STRIPE_WEBHOOK_SECRET": f"whsec_real,{DEV_WEBHOOK_SECRET}"},
    {"DJANGO_DEBUG": "true"},  # DEBUG's default secret
], ids=["set", "among-others", "debug-default"])
def test_livemode_refuses_the_public_development_webhook_secret(env):
    message = refusal(STRIPE_LIVEMODE="true", **REQUIRED, **env)
    assert "STRIPE_LIVEMODE" in message and "STRIPE_WEBHOOK_SECRET" in message


def test_livemode_with_its_own_webhook_secret_starts():
    seen = settings_of("STRIPE_LIVEMODE", "STRIPE_WEBHOOK_SECRETS", STRIPE_LIVEMODE="true",
                       STRIPE_WEBHOOK_SECRET="whsec_live_endpoint", **REQUIRED)
    assert seen == {"STRIPE_LIVEMODE": True, "STRIPE_WEBHOOK_SECRETS": ["whsec_live_endpoint"]}


# --- HTTPS ----------------------------------------------------------------------------------

HTTPS_SETTINGS = ("SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
                  "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_PROXY_SSL_HEADER")


def test_https_is_on_by_default_with_debug_off():
    assert settings_of(*HTTPS_SETTINGS, **REQUIRED) == {
        "SECURE_SSL_REDIRECT": True, "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True, "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True, "SECURE_PROXY_SSL_HEADER": None,
    }


@pytest.mark.parametrize("env", [{"DJANGO_HTTPS": "false"}, {"DJANGO_DEBUG": "true"}],
                         ids=["DJANGO_HTTPS=false", "debug"])
def test_https_is_off_with_django_https_false_or_debug(env):
    seen = settings_of(*HTTPS_SETTINGS, **REQUIRED, **env)
    assert seen["SECURE_SSL_REDIRECT"] is False and seen["SECURE_HSTS_SECONDS"] == 0
    assert seen["SESSION_COOKIE_SECURE"] is False and seen["CSRF_COOKIE_SECURE"] is False


def test_hsts_seconds_and_the_proxy_header_come_from_the_environment():
    seen = settings_of("SECURE_HSTS_SECONDS", "SECURE_PROXY_SSL_HEADER", **REQUIRED,
                       DJANGO_HSTS_SECONDS="600",
                       DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https")
    assert seen == {"SECURE_HSTS_SECONDS": 600,
                    "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"]}


def test_a_proxy_header_without_its_value_is_refused():
    message = refusal(DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO", **REQUIRED)
    assert "DJANGO_SECURE_PROXY_SSL_HEADER" in message


def test_check_deploy_passes_with_only_the_three_required_variables():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=bare_env(
        DJANGO_SECRET_KEY=TEST_SECRET_KEY, DJANGO_ALLOWED_HOSTS="payouts.example.com",
        DATABASE_URL=NOWHERE_DB))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


# --- .env: the demo checkout's choices -------------------------------------------------------


def test_make_run_writes_a_git_ignored_env_file_that_the_settings_read(tmp_path):
    made = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "-C", str(tmp_path),
                           ".env", f"PYTHON={sys.executable}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    env_file = tmp_path / ".env"
    seen = settings_of("DEBUG", "SECRET_KEY", "DATABASES", DJANGO_ENV_FILE=str(env_file))
    assert seen["DEBUG"] is True
    assert seen["DATABASES"]["default"]["ENGINE"] == "console.db_backend"  # type: ignore[index]
    assert len(str(seen["SECRET_KEY"])) >= 50 and "insecure" not in str(seen["SECRET_KEY"])
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO, check=False)
    assert ignored.returncode == 0, ".env is not git-ignored"
    assert env_file.stat().st_mode & 0o077 == 0, "the secret key is readable by others"


def test_env_file_comments_after_a_value_are_not_part_of_it(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("DJANGO_HSTS_SECONDS=60  # a minute, for the demo\n"
                        "DJANGO_SECRET_KEY='quoted # kept whole'\n")
    seen = settings_of("SECURE_HSTS_SECONDS", "SECRET_KEY", DJANGO_ENV_FILE=str(env_file),
                       DATABASE_URL=NOWHERE_DB)
    assert seen["SECURE_HSTS_SECONDS"] == 60
    assert seen["SECRET_KEY"] == "quoted # kept whole"


def test_real_environment_variables_win_over_the_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# the demo\nDJANGO_DEBUG=true\nexport DATABASE_URL='embedded'\n"
                        "DJANGO_HSTS_SECONDS=60\n")
    seen = settings_of("DEBUG", "DATABASES", "SECURE_HSTS_SECONDS",
                       DJANGO_ENV_FILE=str(env_file), DJANGO_DEBUG="false", **REQUIRED)
    assert seen["DEBUG"] is False
    assert seen["SECURE_HSTS_SECONDS"] == 60  # what the environment leaves unset, the file sets
    assert seen["DATABASES"]["default"]["ENGINE"] == "django.db.backends.postgresql"  # type: ignore[index]


# --- settings that must not fail open -------------------------------------------------


@pytest.mark.parametrize("name", ["DJANGO_HTTPS", "STRIPE_LIVEMODE", "DJANGO_DEBUG"])
def test_a_yes_no_setting_that_is_neither_is_refused(name):
    message = refusal(**REQUIRED, **{name: "ture"})
    assert f"{name} must be true or false" in message and "'ture'" in message


def test_the_proxy_header_must_be_a_request_header_key():
    message = refusal(**REQUIRED, DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto,https")
    assert "DJANGO_SECURE_PROXY_SSL_HEADER must be a header and a value" in message


def test_behind_a_proxy_check_deploy_warns_when_lockouts_would_count_the_proxy():
    env = bare_env(**REQUIRED, DJANGO_ALLOWED_HOSTS="payouts.example",
                   DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https")
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode != 0 and "console.W001" in result.stderr, result.stderr
    result = manage("check", "--deploy", "--fail-level", "WARNING",
                    env={**env, "TRUSTED_PROXY_COUNT": "1"})
    assert result.returncode == 0, result.stderr


def test_the_wsgi_server_never_reads_the_demo_env_file(tmp_path):
    """A `.env` left on a production host must not switch DEBUG (and so HTTPS) off: the
    WSGI entry point reads none unless DJANGO_ENV_FILE names one."""
    script = ("import os, console.wsgi, json; from django.conf import settings; "
              "print(json.dumps([os.environ['DJANGO_ENV_FILE'], settings.DEBUG]))")
    env = bare_env(**REQUIRED)
    env.pop("DJANGO_ENV_FILE")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["", False]
    # manage.py, pointed at such a file, does read it (the demo's hand-typed commands).
    env_file = tmp_path / ".env"
    env_file.write_text("DJANGO_DEBUG=true\n")
    seen = settings_of("DEBUG", DJANGO_ENV_FILE=str(env_file), **REQUIRED)
    assert seen["DEBUG"] is True
