from datetime import datetime

from django import template
from django.utils.html import format_html
from django.utils.safestring import SafeString

from console import formats, reconciliation
from console.tables import money as format_money
from console.tables import payout_status as format_payout_status
from console.tables import status_badge
from payouts.models import JobRun, Payout

register = template.Library()


@register.filter
def badge(value: str) -> SafeString:
    return SafeString(status_badge(value))


@register.filter
def payout_status(payout: Payout) -> SafeString:
    return SafeString(format_payout_status(payout))


@register.simple_tag
def money(amount: int | None, currency: str) -> str:
    return format_money(amount, currency)


@register.filter
def run_badge(run: JobRun) -> SafeString:
    """A job run's status: ok green, drifted amber, failed red, abandoned grey, running blue."""
    return SafeString(format_html('<span class="badge run-{}">{}</span>', run.status, run.status))


@register.filter
def run_who(run: JobRun) -> str:
    return reconciliation.run_who(run)


@register.filter
def run_counts(run: JobRun) -> str:
    return reconciliation.run_counts(run)


@register.filter
def run_duration(run: JobRun) -> str:
    return reconciliation.run_duration(run)


@register.filter
def when(value: datetime | None) -> SafeString:
    return formats.when(value)


@register.filter
def relative_time(value: datetime | None) -> SafeString:
    return formats.relative_time(value)
