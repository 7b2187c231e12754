"""Settings read from the environment, checked in fresh processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import TEST_SECRET_KEY

REPO = Path(__file__).resolve().parents[2]


def settings_in_subprocess(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The production settings with only the required variables (and never a .env)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "STRIPE_", "LOG_"))}
    base |= {"DJANGO_ENV_FILE": "", "DJANGO_SECRET_KEY": TEST_SECRET_KEY,
             "DATABASE_URL": "embedded"}
    script = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
              "'console.settings'); django.setup(); from django.conf import settings; " + code)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=base | env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_environment_variables_reach_the_settings():
    result = settings_in_subprocess(
        "print(settings.DEBUG, settings.SECRET_KEY, settings.ALLOWED_HOSTS,"
        " settings.STRIPE_WEBHOOK_SECRETS)",
        DJANGO_DEBUG="true", DJANGO_SECRET_KEY="k" * 50,
        DJANGO_ALLOWED_HOSTS="a.example, b.example",
        STRIPE_WEBHOOK_SECRET="whsec_old,whsec_new",
    )
    assert result.stdout.strip() == (
        f"True {'k' * 50} ['a.example', 'b.example'] ['whsec_old', 'whsec_new']"
    ), result.stderr


def test_safe_defaults_with_only_the_required_variables():
    result = settings_in_subprocess("print(settings.DEBUG, settings.STRIPE_WEBHOOK_SECRETS)")
    assert result.stdout.strip() == "False []", result.stderr


def test_log_format_json_emits_one_json_object_per_line_for_stdlib_and_structlog():
    result = settings_in_subprocess(
        "import logging, structlog;"
        "structlog.get_logger('demo').info('demo.event', payout_id='po_1');"
        "logging.getLogger('plain').warning('from stdlib %s', 'logging')",
        LOG_FORMAT="json",
    )
    lines = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert lines[0]["event"] == "demo.event" and lines[0]["payout_id"] == "po_1"
    assert lines[0]["level"] == "info" and lines[0]["timestamp"].endswith("Z")
    assert lines[1]["event"] == "from stdlib logging" and lines[1]["logger"] == "plain"


def test_an_unknown_log_format_is_refused():
    result = settings_in_subprocess("pass", LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "LOG_FORMAT must be 'console' or 'json'" in result.stderr
