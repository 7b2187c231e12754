from django import template
from django.utils.safestring import SafeString

from console.tables import money as format_money
from console.tables import payout_status as format_payout_status
from console.tables import status_badge
from payouts.models import Payout

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
