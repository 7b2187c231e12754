"""What every console page needs: the counts behind the navigation's badge."""

from typing import Any

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject

from payouts import selectors


def attention(request: HttpRequest) -> dict[str, Any]:
    """Read lazily, once per request, and at most a few seconds old (pages that change
    the counts, Needs attention and a replay in place, read them fresh)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not user.has_perm(
            "payouts.view_webhookevent"):
        return {}
    return {"attention": SimpleLazyObject(selectors.attention_recent)}
