from django import template
from django.utils.safestring import SafeString

from console.tables import money as format_money
from console.tables import status_badge

register = template.Library()


@register.filter
def badge(value: str) -> SafeString:
    return SafeString(status_badge(value))


@register.simple_tag
def money(amount: int | None, currency: str) -> str:
    return format_money(amount, currency)
