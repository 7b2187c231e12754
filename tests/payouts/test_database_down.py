"""With the database unreachable, a valid delivery is refused with 503, so Stripe resends it."""

from payouts import stripe_events
from tests.payouts.helpers import Server, deliver, free_port, server_env


def test_a_delivery_that_cannot_be_stored_is_not_acknowledged():
    """503 (Stripe retries), not 200 (lost) and not a bare 500."""
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/unreachable"
    server = Server(server_env(nowhere, WEBHOOK_PROCESSING="inline"), workers=1, threads=1)
    try:
        event = stripe_events.payout_event(
            "payout.paid", stripe_events.payout_object("po_down", status="paid"))
        answer = deliver(server.url, event)
    finally:
        server.stop()
    assert answer.status == 503
    assert answer.json()["error"] == "unavailable"
