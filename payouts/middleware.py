"""The webhook's lean path through Django."""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.urls import reverse

from payouts.views import stripe_webhook


class WebhookFastPath:
    """Hands Stripe's deliveries straight to the webhook view, past the console's
    middleware (static files, sessions, CSRF, auth, messages, htmx), none of which the
    webhook uses. It sits after SecurityMiddleware, so HTTPS redirects still apply."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.path: str | None = None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if self.path is None:
            self.path = reverse("stripe-webhook")  # the URLconf is the one place for the path
        if request.path == self.path:
            return stripe_webhook(request)
        return self.get_response(request)
