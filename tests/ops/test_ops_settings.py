"""The alert and metrics settings: read from the environment, a bad value refused with
its name."""

import pytest

from tests.console.test_settings import settings_in_subprocess


def test_alert_and_metrics_settings_reach_the_settings() -> None:
    result = settings_in_subprocess(
        "print(settings.ALERT_DEAD_EVENTS, settings.ALERT_FAILURE_RATE, settings.ALERT_EMAILS,"
        " settings.EMAIL_PORT, settings.EMAIL_USE_TLS, bool(settings.METRICS_TOKEN))",
        ALERT_DEAD_EVENTS="3", ALERT_FAILURE_RATE="0.5", ALERT_EMAILS="a@x.org, b@x.org",
        EMAIL_PORT="2525", EMAIL_USE_TLS="yes", METRICS_TOKEN="t" * 32)
    assert result.stdout.strip() == "3 0.5 ['a@x.org', 'b@x.org'] 2525 True True", result.stderr


@pytest.mark.parametrize(("name", "value", "said"), [
    ("ALERT_DEAD_EVENTS", "many", "ALERT_DEAD_EVENTS must be a whole number"),
    ("ALERT_DEAD_EVENTS", "-1", "ALERT_DEAD_EVENTS must be at least 0"),
    ("ALERT_FAILURE_RATE", "20", "ALERT_FAILURE_RATE is a share, 0 to 1"),
    ("ALERT_FAILURE_MIN_COUNT", "0", "ALERT_FAILURE_MIN_COUNT must be at least 1"),
    ("ALERT_STUCK_GRACE_HOURS", "a day", "ALERT_STUCK_GRACE_HOURS must be a number"),
    ("ALERT_WEBHOOK_URL", "hooks.slack.com/x", "ALERT_WEBHOOK_URL must be an http(s):// URL"),
    ("ALERT_EMAILS", "oncall", "ALERT_EMAILS must be comma-separated e-mail addresses"),
    ("EMAIL_PORT", "smtp", "EMAIL_PORT must be a whole number"),
    ("EMAIL_USE_TLS", "maybe", "EMAIL_USE_TLS must be true or false"),
    ("METRICS_TOKEN", "short", "METRICS_TOKEN must be at least 16 characters"),
])
def test_a_bad_value_is_refused_with_its_name(name: str, value: str, said: str) -> None:
    result = settings_in_subprocess("pass", **{name: value})
    assert result.returncode != 0 and said in result.stderr, result.stderr[-500:]
