"""What every console page needs: the counts behind the navigation's badge."""

from typing import Any

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject

from payouts import selectors


def attention(request: HttpRequest) -> dict[str, Any]:
    """Counted lazily, once per request: only pages that draw the navigation pay."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not user.has_perm(
            "payouts.view_webhookevent"):
        return {}
    return {"attention": SimpleLazyObject(selectors.attention)}
