"""What every console page needs: the counts behind the navigation's badge."""

from typing import Any

from django.http import HttpRequest

from payouts import selectors


def attention(request: HttpRequest) -> dict[str, Any]:
    """Counted lazily: only pages that draw the navigation for a signed-in user pay."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not user.has_perm(
            "payouts.view_webhookevent"):
        return {}
    return {"attention": selectors.attention}
