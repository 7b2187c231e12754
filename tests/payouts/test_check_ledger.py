"""`manage.py check_ledger`: each money invariant, broken on purpose, is reported with its ids."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from payouts.models import PaymentTransaction, PaymentTransfer, Payout
from tests.factories import make_payout

pytestmark = pytest.mark.django_db


def check() -> tuple[int, str]:
    """Run the command: its exit code and what it printed."""
    out = io.StringIO()
    try:
        call_command("check_ledger", stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def txns(payout: Payout) -> list[PaymentTransaction]:
    return list(PaymentTransaction.objects.filter(transfers__payout_items__payout=payout)
                .order_by("id"))


def test_a_consistent_ledger_passes():
    make_payout(status="paid")
    failed = make_payout(status="failed", transactions=2)
    PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns(failed)]).update(
        payed_out=False, actual_release_date=None)
    assert check() == (0, "ledger ok: every money invariant holds\n")


def failed_still_paid_out() -> tuple[str, str]:
    payout = make_payout(status="failed", transactions=1)
    return "returned_released", (f"transaction {txns(payout)[0].pk} is still paid out, but "
                                 f"{payout.stripe_payout_id} (failed) gave its money back")


def reversed_still_paid_out() -> tuple[str, str]:
    payout = make_payout(status="paid", transactions=1)
    Payout.objects.filter(pk=payout.pk).update(reversed_at=timezone.now())
    return "returned_released", f"{payout.stripe_payout_id} (reversed) gave its money back"


def in_two_live_payouts() -> tuple[str, str]:
    first = make_payout(status="paid", transactions=1)
    second = make_payout(first.seller, status="in_transit", transactions=0)
    second.payout_items.create(payment_transfer=PaymentTransfer.objects.get(
        payout_items__payout=first))
    [txn] = txns(first)
    holders = sorted([f"{first.stripe_payout_id} (paid)",
                      f"{second.stripe_payout_id} (in_transit)"])
    return "paid_out_in_one_live_payout", (
        f"transaction {txn.pk} is paid out in 2 live payouts: {', '.join(holders)}")


def paid_out_without_payout() -> tuple[str, str]:
    payout = make_payout(status="paid", transactions=1)
    loose = PaymentTransaction.objects.create(
        seller=payout.seller, amount=5, currency="usd", release_date=timezone.localdate(),
        payed_out=True, actual_release_date=timezone.now())
    return "paid_out_in_one_live_payout", f"transaction {loose.pk} is paid out but in no payout"


def released_in_a_live_payout() -> tuple[str, str]:
    payout = make_payout(status="in_transit", transactions=2)
    txn = txns(payout)[1]
    PaymentTransaction.objects.filter(pk=txn.pk).update(payed_out=False,
                                                        actual_release_date=None)
    return "live_payout_paid_out", (f"transaction {txn.pk} is released (owed again) but live "
                                    f"payout {payout.stripe_payout_id} (in_transit) holds it")


def release_date_out_of_step() -> tuple[str, str]:
    payout = make_payout(status="paid", transactions=1)
    [txn] = txns(payout)
    PaymentTransaction.objects.filter(pk=txn.pk).update(actual_release_date=None)
    return "release_date", f"transaction {txn.pk} is paid out but has no actual release date"


def items_do_not_add_up() -> tuple[str, str]:
    payout = make_payout(status="pending", transactions=2)
    Payout.objects.filter(pk=payout.pk).update(reference="pcp_short", amount=2001)
    return "items_add_up", (f"payout pcp_short ({payout.stripe_payout_id}, id {payout.pk}) is "
                            "for 2001 but its 2 item(s) add up to 2000")


@pytest.mark.ledger_broken_on_purpose
@pytest.mark.parametrize("breakage", [
    failed_still_paid_out, reversed_still_paid_out, in_two_live_payouts,
    paid_out_without_payout, released_in_a_live_payout, release_date_out_of_step,
    items_do_not_add_up,
], ids=lambda f: f.__name__)
def test_each_broken_invariant_is_reported_with_its_ids(
        breakage: Callable[[], tuple[str, str]]) -> None:
    make_payout(status="paid")  # a healthy neighbour, never reported
    name, expected = breakage()

    code, output = check()

    assert code == 1, output
    lines = [line for line in output.splitlines() if line.startswith(f"{name}: ")]
    assert len(lines) == 1, output
    assert expected in lines[0], output
    assert output.count(": transaction") + output.count(": payout") == 1, output
    assert "1 violation(s) of the ledger's invariants" in output
