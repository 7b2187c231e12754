import pytest

from payouts import stripe_events
from payouts.models import Payout, WebhookEvent
from tests.factories import make_payout
from tests.payouts.helpers import deliver

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_signed_failed_event_is_stored_and_applied_inline(inline_server):
    payout = make_payout(status="paid")
    obj = stripe_events.payout_object(payout.stripe_payout_id, amount=payout.amount,
                                      status="failed", **stripe_events.failed_payout_defaults())
    event = stripe_events.payout_event("payout.failed", obj,
                                       account=payout.seller.stripe_account_id)
    answer = deliver(inline_server.url, event)
    assert answer.status == 200, answer.body
    assert answer.json() == {"received": True, "duplicate": False, "status": "processed"}
    assert WebhookEvent.objects.get().status == "processed"
    assert Payout.objects.get().status == "failed"
