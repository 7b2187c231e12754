"""How the console writes times for people: the exact UTC time and a relative form."""

from datetime import UTC, datetime

from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince, timeuntil


def relative(value: datetime, now: datetime | None = None) -> str:
    """"3 minutes ago", "in 38 minutes", "just now"."""
    now = now or timezone.now()
    if abs((value - now).total_seconds()) < 60:
        return "just now"
    if value > now:
        return f"in {timeuntil(value, now, depth=1)}"
    return f"{timesince(value, now, depth=1)} ago"


def exact(value: datetime) -> str:
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def when(value: datetime | None) -> SafeString:
    """The time with its zone, and how long ago (or until) in a smaller muted form."""
    if value is None:
        return SafeString("—")
    return format_html('<time datetime="{}" title="{}">{}</time> <span class="rel">{}</span>',
                       value.isoformat(), exact(value),
                       f"{value.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
                       relative(value))


def relative_time(value: datetime | None) -> SafeString:
    """Relative only ("in 38 minutes", "3 minutes ago"), the exact UTC time on hover."""
    if value is None:
        return SafeString("—")
    return format_html('<time datetime="{}" title="{}">{}</time>', value.isoformat(),
                       exact(value), relative(value))
