"""Paying sellers (`create_payouts`) against a fake Stripe over real HTTP, crashes included.

The command runs in its own process, with the real stripe-python client, against
the test database and ``tests.fakestripe.FakeStripe`` on 127.0.0.1. Crashes are
real: the process is SIGKILLed while the fake holds one of its requests, either
before Stripe made the object or after (made, answer never delivered). Every wait
is bounded; nothing asserts how long anything took.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from django.db.models import F
from django.utils import timezone

from payouts import stripe_events
from payouts.models import PaymentTransaction, PaymentTransfer, Payout, PayoutItem, Seller
from tests.factories import make_seller
from tests.fakestripe import FakeStripe, Request
from tests.payouts.helpers import REPO, Server, deliver, free_port, server_env

pytestmark = pytest.mark.django_db(transaction=True)

API_KEY = "sk_test_fake"
RUN_S = 60  # bound for one run of the command
METADATA = "metadata[payout_console_payout]"


# --- the fake, processes, ledger rows ---------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


@pytest.fixture
def env(test_database_url: str, fake: FakeStripe) -> dict[str, str]:
    return server_env(test_database_url, STRIPE_API_KEY=API_KEY, STRIPE_API_BASE=fake.url)


def command(*args: str) -> list[str]:
    return [sys.executable, "manage.py", "create_payouts", *args]


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=RUN_S, check=False)


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(command(*args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = process.communicate(timeout=RUN_S)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()  # SIGKILL: no cleanup, no answer
    process.communicate(timeout=RUN_S)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def seller_owed(amounts: tuple[int, ...] = (1000, 2500, 730), currency: str = "usd",
                ) -> tuple[Seller, list[PaymentTransaction]]:
    """A seller with released, unpaid transactions (and one released only tomorrow)."""
    seller = make_seller()
    today = timezone.localdate()
    txns = [PaymentTransaction.objects.create(
        seller=seller, amount=amount, currency=currency,
        release_date=today - timedelta(days=k)) for k, amount in enumerate(amounts)]
    PaymentTransaction.objects.create(seller=seller, amount=99_999, currency=currency,
                                      release_date=today + timedelta(days=1))
    return seller, txns


def posts(fake: FakeStripe, prefix: str, since: int = 0) -> list[Request]:
    return [r for r in fake.requests[since:] if r.method == "POST" and r.path.startswith(prefix)]


def paid_once(fake: FakeStripe, seller: Seller, txns: list[PaymentTransaction]) -> Payout:
    """Exactly one submitted payout for ``txns``, its ids the fake's, nothing doubled."""
    payouts = list(Payout.objects.filter(seller=seller))
    assert len(payouts) == 1, payouts
    payout = payouts[0]
    assert payout.creation_state == Payout.Creation.SUBMITTED
    assert payout.reference
    assert payout.amount == sum(t.amount for t in txns)
    # at the fake: one payout on the seller's account, for our reference and amount
    made = [p for p in fake.payouts.values() if p["metadata"].get("payout_console_payout")
            == payout.reference]
    assert [p["id"] for p in made] == [payout.stripe_payout_id]
    assert fake.payout_accounts[payout.stripe_payout_id] == seller.stripe_account_id
    assert made[0]["amount"] == payout.amount
    assert len(fake.payouts) == 1
    # one transfer per transaction, here and at the fake, with the same ids
    transfers = list(PaymentTransfer.objects.filter(payout_items__payout=payout))
    assert sorted(t.payment_transaction_id for t in transfers) == sorted(t.pk for t in txns)
    assert PayoutItem.objects.filter(payout=payout).count() == len(txns)
    at_fake = {tid: t for tid, t in fake.transfers.items()
               if t["transfer_group"] == payout.reference}
    assert len(at_fake) == len(txns), at_fake
    assert {t.stripe_transfer_id for t in transfers} == set(at_fake)
    for transfer in transfers:
        seen = at_fake[transfer.stripe_transfer_id]
        assert seen["amount"] == transfer.amount
        assert seen["destination"] == seller.stripe_account_id
        assert seen["metadata"] == {"payout_console_payout": payout.reference,
                                    "payout_console_transfer": str(transfer.pk)}
        assert not seen["reversed"]
    for txn in PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns]):
        assert txn.payed_out and txn.actual_release_date is not None
    return payout


def no_key_twice_with_different_answers(fake: FakeStripe) -> None:
    """Every Idempotency-Key the fake saw was answered with one object id only."""
    ids: dict[str, set[str]] = {}
    for r in fake.requests:
        if r.idempotency_key and r.status == 200 and r.response:
            ids.setdefault(r.idempotency_key, set()).add(r.response["id"])
    assert all(len(v) == 1 for v in ids.values()), ids


def paid_event(fake: FakeStripe, payout_id: str) -> dict[str, Any]:
    """Stripe's ``payout.paid`` for a payout the fake made, from the connected account."""
    obj = {**fake.payouts[payout_id], "status": "paid", "reconciliation_status": "completed"}
    return stripe_events.payout_event("payout.paid", obj,
                                      account=fake.payout_accounts[payout_id])


# --- the fake itself ----------------------------------------------------------------------


def call(fake: FakeStripe, path: str, params: dict[str, Any], *, key: str | None = None,
         account: str | None = None, api_key: str = API_KEY) -> tuple[int, dict[str, str],
                                                                      dict[str, Any]]:
    parts = urlsplit(fake.url)
    headers = {"Authorization": f"Bearer {api_key}", "Stripe-Version": "2025-09-30.clover",
               "Content-Type": "application/x-www-form-urlencoded"}
    if key:
        headers["Idempotency-Key"] = key
    if account:
        headers["Stripe-Account"] = account
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", path, body=urlencode(params), headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


TRANSFER = {"amount": 500, "currency": "usd", "destination": "acct_1",
            "metadata[payout_console_payout]": "pcp_x"}


def test_fake_replays_the_same_key_and_refuses_other_parameters(fake: FakeStripe) -> None:
    status, _, first = call(fake, "/v1/transfers", TRANSFER, key="k1")
    assert status == 200 and first["id"].startswith("tr_") and first["object"] == "transfer"
    assert first["metadata"] == {"payout_console_payout": "pcp_x"} and not first["reversed"]

    status, headers, again = call(fake, "/v1/transfers", TRANSFER, key="k1")
    assert status == 200 and again == first
    assert headers["Idempotent-Replayed"] == "true"
    assert len(fake.transfers) == 1 and len(fake.replays("/v1/transfers")) == 1

    status, _, refused = call(fake, "/v1/transfers", {**TRANSFER, "amount": 501}, key="k1")
    assert status == 400 and refused["error"]["type"] == "idempotency_error"
    assert "same parameters" in refused["error"]["message"]
    assert len(fake.transfers) == 1

    status, _, other = call(fake, "/v1/transfers", TRANSFER, key="k2")
    assert status == 200 and other["id"] != first["id"] and len(fake.transfers) == 2

    status, _, denied = call(fake, "/v1/transfers", TRANSFER, key="k3", api_key="sk_live_x")
    assert status == 401 and "Invalid API Key" in denied["error"]["message"]
    assert len(fake.transfers) == 2

    status, _, refused = call(fake, "/v1/payouts", {"amount": 500, "currency": "usd"}, key="p1")
    assert status == 400  # no Stripe-Account: not a seller payout
    status, _, payout = call(fake, "/v1/payouts", {"amount": 500, "currency": "usd"},
                             key="p1", account="acct_1")
    assert status == 200 and payout["object"] == "payout" and payout["status"] == "pending"

    status, _, reversal = call(fake, f"/v1/transfers/{first['id']}/reversals", {}, key="r1")
    assert status == 200 and reversal["object"] == "transfer_reversal"
    assert reversal["id"].startswith("trr_") and fake.transfers[first["id"]]["reversed"]


def test_fake_failures_and_holds(fake: FakeStripe) -> None:
    fake.fail_payouts_for("acct_2")
    status, _, error = call(fake, "/v1/payouts", {"amount": 1, "currency": "usd"}, key="p",
                            account="acct_2")
    assert status == 400 and error["error"]["code"] == "payouts_not_allowed"
    fake.allow_payouts_for("acct_2")  # the refusal is kept for that key, as Stripe keeps it
    assert call(fake, "/v1/payouts", {"amount": 1, "currency": "usd"}, key="p",
                account="acct_2")[0] == 400
    assert call(fake, "/v1/payouts", {"amount": 1, "currency": "usd"}, key="p2",
                account="acct_2")[0] == 200

    fake.fail_next("/v1/transfers", status=500)  # the endpoint failed: its 500 is kept
    assert call(fake, "/v1/transfers", TRANSFER, key="t")[0] == 500
    status, headers, replayed = call(fake, "/v1/transfers", TRANSFER, key="t")
    assert status == 500 and headers["Idempotent-Replayed"] == "true"
    assert "injected transient error" in replayed["error"]["message"]
    fake.advance(24 * 3600 - 60)  # still kept a minute before 24 h
    assert call(fake, "/v1/transfers", TRANSFER, key="t")[0] == 500
    fake.advance(60)  # then forgotten: the same key makes a new request
    assert call(fake, "/v1/transfers", TRANSFER, key="t")[0] == 200
    assert len(fake.transfers) == 1
    fake.fail_next("/v1/transfers", status=429)  # refused before it started: nothing kept
    assert call(fake, "/v1/transfers", TRANSFER, key="t429")[0] == 429
    assert call(fake, "/v1/transfers", TRANSFER, key="t429")[0] == 200
    assert len(fake.transfers) == 2

    answers: list[int] = []
    for when in ("before", "after"):
        made = len(fake.transfers)
        fake.hold("/v1/transfers", when=when)
        key = f"held-{when}"
        caller = threading.Thread(target=lambda k=key: answers.append(
            call(fake, "/v1/transfers", TRANSFER, key=k)[0]))
        caller.start()
        held = fake.wait_held(timeout=10)
        assert held.idempotency_key == key and held.held == when
        assert held.status == (200 if when == "after" else 0)
        assert len(fake.transfers) == made + (when == "after")  # made only once processed
        fake.release()
        assert held.status == 200 and len(fake.transfers) == made + 1
        caller.join(timeout=10)
        assert not caller.is_alive()
    assert answers == [200, 200] and len(fake.transfers) == 4


# --- create_payouts end to end --------------------------------------------------------


def test_happy_path_then_paid_webhook(fake: FakeStripe, env: dict[str, str],
                                      inline_server: Server) -> None:
    seller, txns = seller_owed()
    other, _ = seller_owed((400,))
    ok(run(env, "--seller", seller.stripe_account_id))
    payout = paid_once(fake, seller, txns)
    assert payout.status == Payout.Status.PENDING
    assert payout.stripe_payout_id and payout.stripe_payout_id.startswith("po_")
    assert payout.arrival_date is not None
    assert not Payout.objects.filter(seller=other).exists()  # --seller: only that one
    assert not PaymentTransaction.objects.filter(payed_out=True).exclude(seller=seller).exists()
    assert not PaymentTransaction.objects.filter(seller=seller, payed_out=False,
                                                 release_date__lte=timezone.localdate()).exists()

    # what went over the wire: the contract's keys, headers and parameters
    transfers = posts(fake, "/v1/transfers")
    assert len(transfers) == len(txns) and not fake.replays()
    ours = {t.pk: t for t in PaymentTransfer.objects.filter(payout_items__payout=payout)}
    for request in transfers:
        pk = int(request.params["metadata[payout_console_transfer]"])
        assert request.idempotency_key == f"{payout.reference}:transfer:{pk}"
        assert request.params == {
            "amount": str(ours[pk].amount), "currency": "usd",
            "destination": seller.stripe_account_id, "transfer_group": payout.reference,
            METADATA: payout.reference, "metadata[payout_console_transfer]": str(pk)}
        assert request.account is None  # transfers are made on the platform
    (payout_request,) = posts(fake, "/v1/payouts")
    assert payout_request.idempotency_key == f"{payout.reference}:payout"
    assert payout_request.account == seller.stripe_account_id
    assert payout_request.params == {"amount": str(payout.amount), "currency": "usd",
                                     METADATA: payout.reference}
    for request in fake.requests:
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.headers["content-type"].startswith("application/x-www-form-urlencoded")
        assert request.headers.get("stripe-version")

    answer = deliver(inline_server.url, paid_event(fake, payout.stripe_payout_id))
    assert answer.status == 200 and answer.json()["status"] == "processed", answer.body
    payout.refresh_from_db()
    assert payout.status == Payout.Status.PAID
    assert set(PaymentTransfer.objects.filter(payout_items__payout=payout)
               .values_list("status", flat=True)) == {PaymentTransfer.Status.PAID}


def test_two_runs_at_once_pay_once(fake: FakeStripe, env: dict[str, str]) -> None:
    seller, txns = seller_owed((100, 200, 300, 400, 500))
    runs = [start(env), start(env, "--seller", seller.stripe_account_id)]
    results = [finish(each) for each in runs]
    for result in results:
        ok(result)
    paid_once(fake, seller, txns)
    per_txn = Counter(PayoutItem.objects.values_list("payment_transfer__payment_transaction",
                                                     flat=True))
    assert per_txn and max(per_txn.values()) == 1, per_txn
    assert PaymentTransfer.objects.count() == len(txns)
    no_key_twice_with_different_answers(fake)


@pytest.mark.parametrize("path, when", [("/v1/transfers", "before"),
                                        ("/v1/transfers", "after"),
                                        ("/v1/payouts", "after")],
                         ids=["transfer-not-made", "transfer-made-unanswered",
                              "payout-made-unanswered"])
def test_crash_in_phase_2_then_rerun(fake: FakeStripe, env: dict[str, str], path: str,
                                     when: str) -> None:
    seller, txns = seller_owed()
    fake.hold(path, when=when)
    crashed = start(env)
    held = fake.wait_held(timeout=RUN_S)
    if when == "after":  # Stripe made it; the command never hears of it
        assert held.response is not None and held.response["id"] in {**fake.transfers,
                                                                    **fake.payouts}
    kill(crashed)
    payout = Payout.objects.get(seller=seller)
    assert payout.creation_state == Payout.Creation.RESERVED and payout.stripe_payout_id is None
    assert list(PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns])
                .values_list("payed_out", flat=True)) == [True] * len(txns)
    fake.release()  # a request held before processing reaches Stripe late: made now
    if when == "before":
        assert held.status == 200 and held.response["id"] in fake.transfers
    before_rerun = len(fake.requests)

    ok(run(env))
    paid_once(fake, seller, txns)
    rerun = fake.requests[before_rerun:]
    again = [r for r in rerun if r.idempotency_key == held.idempotency_key]
    assert len(again) == 1 and again[0].replayed, "the re-run resent the held request's key"
    assert again[0].response == held.response
    if path == "/v1/payouts":  # every transfer and the payout were replayed
        assert all(r.replayed for r in rerun if r.method == "POST"), rerun
    no_key_twice_with_different_answers(fake)


def test_rerun_after_a_completed_run_makes_nothing(fake: FakeStripe,
                                                   env: dict[str, str]) -> None:
    seller, txns = seller_owed()
    ok(run(env))
    payout = paid_once(fake, seller, txns)
    seen = len(fake.requests)
    ok(run(env))
    ok(run(env, "--seller", seller.stripe_account_id))
    assert fake.requests[seen:] == []
    assert paid_once(fake, seller, txns).pk == payout.pk


def test_final_stripe_error_releases_then_a_new_payout_pays(fake: FakeStripe,
                                                            env: dict[str, str]) -> None:
    seller, txns = seller_owed()
    fake.fail_payouts_for(seller.stripe_account_id)
    ok(run(env))
    failed = Payout.objects.get(seller=seller)
    assert failed.status == Payout.Status.FAILED
    assert failed.creation_state == Payout.Creation.FAILED
    assert failed.stripe_payout_id is None and not fake.payouts
    # every transfer Stripe made was reversed there and here
    made = {tid for tid, t in fake.transfers.items() if t["transfer_group"] == failed.reference}
    assert len(made) == len(txns)
    assert all(fake.transfers[tid]["reversed"] for tid in made)
    assert {r["transfer"] for r in fake.reversals.values()} == made
    for request in posts(fake, "/v1/transfers/"):
        tid = request.path.split("/")[3]
        pk = fake.transfers[tid]["metadata"]["payout_console_transfer"]
        assert request.idempotency_key == f"{failed.reference}:reversal:{pk}"
    old = PaymentTransfer.objects.filter(payout_items__payout=failed)
    assert {t.stripe_transfer_id for t in old} == made
    assert set(old.values_list("status", flat=True)) == {PaymentTransfer.Status.REVERSED}
    for txn in PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns]):
        assert not txn.payed_out and txn.actual_release_date is None

    fake.allow_payouts_for(seller.stripe_account_id)
    ok(run(env))
    new = Payout.objects.exclude(pk=failed.pk).get(seller=seller)
    assert new.reference != failed.reference
    assert new.creation_state == Payout.Creation.SUBMITTED
    assert [new.stripe_payout_id] == list(fake.payouts)
    fresh = PaymentTransfer.objects.filter(payout_items__payout=new)
    assert sorted(t.payment_transaction_id for t in fresh) == sorted(t.pk for t in txns)
    assert not {t.stripe_transfer_id for t in fresh} & made
    assert all(not fake.transfers[t.stripe_transfer_id]["reversed"] for t in fresh)
    assert fake.payouts[new.stripe_payout_id]["amount"] == sum(t.amount for t in txns)
    for txn in PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns]):
        assert txn.payed_out
    failed.refresh_from_db()
    assert failed.status == Payout.Status.FAILED  # history stays


def test_a_429_leaves_the_payout_resumable_with_the_same_keys(fake: FakeStripe,
                                                              env: dict[str, str]) -> None:
    """A 429 on the payout (refused before it started, nothing kept): the contract's client
    does not retry (max_network_retries=0), so the run ends with the payout reserved; the
    next one finishes it with the same keys."""
    seller, txns = seller_owed()
    fake.fail_next("/v1/payouts", status=429)
    first = run(env)
    attempts = len(posts(fake, "/v1/payouts"))
    assert first.returncode != 0, (
        f"exit 0 although /v1/payouts answered 429: the client sent it {attempts} "
        f"time(s) in one run (contract: max_network_retries=0)\n{first.stdout}")
    payout = Payout.objects.get(seller=seller)
    assert payout.creation_state == Payout.Creation.RESERVED
    assert payout.status == Payout.Status.PENDING and payout.stripe_payout_id is None
    assert payout.submitted_at is not None
    assert len(fake.transfers) == len(txns) and not fake.payouts
    first_keys = [r.idempotency_key for r in fake.requests if r.method == "POST"]
    seen = len(fake.requests)

    ok(run(env))
    assert paid_once(fake, seller, txns).pk == payout.pk
    rerun = [r for r in fake.requests[seen:] if r.method == "POST"]
    assert [r.idempotency_key for r in rerun] == first_keys  # the same keys, in order
    assert all(r.replayed for r in rerun[:-1]) and not rerun[-1].replayed
    no_key_twice_with_different_answers(fake)


def age(payout: Payout, fake: FakeStripe, hours: float) -> None:
    """Let ``hours`` pass, for us (the payout was submitted that much earlier) and Stripe."""
    Payout.objects.filter(pk=payout.pk).update(
        submitted_at=F("submitted_at") - timedelta(hours=hours))
    fake.advance(hours * 3600)


def test_a_saved_500_is_replayed_until_the_key_is_forgotten_then_looked_up_and_paid_once(
        fake: FakeStripe, env: dict[str, str]) -> None:
    """Stripe keeps a 500 for its key and replays it: resumes within 24 h end where the
    first did. Past 23 h the resume looks up what Stripe made first (the transfers, no
    payout), records it, and sends only the payout: made once, once the key is gone."""
    seller, txns = seller_owed()
    fake.fail_next("/v1/payouts", status=500)
    assert run(env).returncode != 0
    payout = Payout.objects.get(seller=seller)
    for _ in range(2):  # within 24 h: the same 500 again, nothing made
        assert run(env).returncode != 0
    replays = [r for r in posts(fake, "/v1/payouts") if r.replayed]
    assert len(replays) == 2 and all(r.status == 500 for r in replays)
    assert not fake.payouts and not fake.seen("GET")
    payout.refresh_from_db()
    assert payout.creation_state == Payout.Creation.RESERVED

    age(payout, fake, 25)
    seen = len(fake.requests)
    ok(run(env))

    assert paid_once(fake, seller, txns).pk == payout.pk
    rerun = fake.requests[seen:]
    assert [(r.method, r.path) for r in rerun] == [
        ("GET", "/v1/transfers"), ("GET", "/v1/payouts"), ("POST", "/v1/payouts")], rerun
    assert rerun[0].params["transfer_group"] == payout.reference
    assert rerun[1].account == seller.stripe_account_id
    assert not rerun[2].replayed  # the key was forgotten: a new request, made once


def crashed_after_stripe_made_the_payout(fake: FakeStripe, env: dict[str, str],
                                         ) -> tuple[Seller, list[PaymentTransaction], Payout]:
    """The command made the transfers and the payout at Stripe and died unanswered."""
    seller, txns = seller_owed()
    fake.hold("/v1/payouts", when="after")
    crashed = start(env)
    fake.wait_held(timeout=RUN_S)
    kill(crashed)
    fake.release()
    return seller, txns, Payout.objects.get(seller=seller)


def test_a_resume_past_23_hours_records_what_stripe_made_and_sends_nothing(
        fake: FakeStripe, env: dict[str, str]) -> None:
    """A crash after Stripe made the transfers and the payout, resumed 30 h later when
    Stripe may have forgotten the keys: sending them blind could pay twice. The resume
    finds both at Stripe, records them, and sends no write at all."""
    seller, txns, payout = crashed_after_stripe_made_the_payout(fake, env)
    assert payout.creation_state == Payout.Creation.RESERVED and payout.stripe_payout_id is None
    age(payout, fake, 30)
    seen = len(fake.requests)

    ok(run(env))

    assert paid_once(fake, seller, txns).pk == payout.pk
    assert [r.method for r in fake.requests[seen:]] == ["GET", "GET"]


def test_a_payout_failed_before_phase_3_makes_no_new_transfers(
        fake: FakeStripe, env: dict[str, str], inline_server: Server) -> None:
    """Stripe made the transfers and the payout, and its payout.failed arrived before we
    recorded their ids (the run died). The webhook released the transactions; the next
    run must reuse the transfers standing on the seller's balance, not make new ones."""
    seller, txns = seller_owed()
    fake.hold("/v1/payouts", when="after")
    crashed = start(env)
    held = fake.wait_held(timeout=RUN_S)
    stripe_id = held.response["id"]
    failed = {**fake.payouts[stripe_id], "status": "failed", "failure_code": "account_closed",
              "failure_message": "The bank account has been closed."}
    answer = deliver(inline_server.url, stripe_events.payout_event(
        "payout.failed", failed, account=seller.stripe_account_id))
    assert answer.json()["status"] == "processed", answer.body
    kill(crashed)
    fake.release()
    first = Payout.objects.get(seller=seller)
    assert (first.stripe_payout_id, first.status) == (stripe_id, Payout.Status.FAILED)
    assert first.creation_state == Payout.Creation.RESERVED
    assert not PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns], payed_out=True)

    ok(run(env))

    first.refresh_from_db()
    assert first.creation_state == Payout.Creation.SUBMITTED  # resumed: ids recorded
    assert first.status == Payout.Status.FAILED
    second = Payout.objects.exclude(pk=first.pk).get(seller=seller)
    assert second.creation_state == Payout.Creation.SUBMITTED
    assert len(fake.transfers) == len(txns), "new transfers for money already transferred"
    assert sorted(PaymentTransfer.objects.filter(payout_items__payout=second)
                  .values_list("stripe_transfer_id", flat=True)) == sorted(fake.transfers)
    assert len(fake.payouts) == 2 and fake.payouts[second.stripe_payout_id]["amount"] == sum(
        t.amount for t in txns)
    assert PaymentTransaction.objects.filter(seller=seller, payed_out=True).count() == len(txns)


def test_no_new_payout_for_a_seller_whose_payout_is_still_reserved(
        fake: FakeStripe, env: dict[str, str]) -> None:
    """While a seller's payout cannot be finished, the seller gets no second one, even
    for money released since."""
    seller, _ = seller_owed()
    fake.fail_next("/v1/transfers", status=429)
    assert run(env).returncode != 0
    reserved = Payout.objects.get(seller=seller)
    more = PaymentTransaction.objects.create(seller=seller, amount=4200, currency="usd",
                                             release_date=timezone.localdate())
    fake.fail_next("/v1/transfers", status=429)

    again = run(env)

    assert again.returncode != 0
    assert f"has payout {reserved.reference} still reserved" in again.stderr
    assert list(Payout.objects.filter(seller=seller)) == [reserved]
    assert not PaymentTransaction.objects.get(pk=more.pk).payed_out
    dry = ok(run(env, "--dry-run"))
    assert f"would resume {reserved.reference}" in dry.stdout
    assert "until its reserved payout is finished" in dry.stdout

    ok(run(env))  # resumed, then the new money in a second payout
    assert Payout.objects.filter(seller=seller, creation_state="submitted").count() == 2


def test_a_release_refuses_when_stripe_has_the_payout(
        fake: FakeStripe, env: dict[str, str], inline_server: Server) -> None:
    """Stripe refuses the payout request, but a payout carrying our reference was linked
    and paid by its webhook meanwhile: releasing the transactions would pay them twice.
    Nothing is reversed or released, and the payout is marked for review."""
    seller, txns = seller_owed()
    fake.hold("/v1/payouts", when="before")
    running = start(env)
    try:
        held = fake.wait_held(timeout=RUN_S)
        reference = held.params[METADATA]
        ours = Payout.objects.get(reference=reference)
        made = stripe_events.payout_object(stripe_events.new_id("po"), status="paid",
                                           amount=ours.amount, metadata={
                                               "payout_console_payout": reference})
        answer = deliver(inline_server.url, stripe_events.payout_event(
            "payout.paid", made, account=seller.stripe_account_id))
        assert answer.json()["status"] == "processed", answer.body
        fake.fail_payouts_for(seller.stripe_account_id)
    finally:
        fake.release()
    result = finish(running)

    assert result.returncode != 0
    assert "its money was not released" in result.stderr, result.stderr
    payout = Payout.objects.get(reference=reference)
    assert payout.status == Payout.Status.PAID and payout.stripe_payout_id == made["id"]
    assert payout.creation_state == Payout.Creation.RESERVED
    assert "Stripe refused a request for it" in payout.review_reason
    assert not fake.reversals
    assert PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns],
                                             payed_out=True).count() == len(txns)


def test_unreachable_stripe_leaves_the_payout_resumable(
        fake: FakeStripe, env: dict[str, str], test_database_url: str) -> None:
    seller, txns = seller_owed()
    closed = server_env(test_database_url, STRIPE_API_KEY=API_KEY,
                        STRIPE_API_BASE=f"http://127.0.0.1:{free_port()}")  # refused
    first = run(closed)
    assert first.returncode != 0, first.stdout
    payout = Payout.objects.get(seller=seller)
    assert payout.creation_state == Payout.Creation.RESERVED
    assert all(PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns])
               .values_list("payed_out", flat=True))

    ok(run(env))
    assert paid_once(fake, seller, txns).pk == payout.pk
    assert [r.idempotency_key for r in posts(fake, "/v1/payouts")] == [
        f"{payout.reference}:payout"]


def test_a_late_final_error_does_not_release_money_paid_since(
        fake: FakeStripe, env: dict[str, str]) -> None:
    """Two runs finish one payout refused by Stripe. The slow one (held at its first
    reversal) ends after the fast one released the transactions and paid them in a
    new payout: the slow one's release must not make them payable a second time."""
    seller, txns = seller_owed()
    fake.fail_payouts_for(seller.stripe_account_id)
    fake.hold("/v1/transfers/", when="before")  # the slow run's first reversal
    slow = start(env)
    try:
        fake.wait_held(timeout=RUN_S)
        fake.allow_payouts_for(seller.stripe_account_id)  # the refusal stays kept for its key
        ok(run(env))  # resumes, fails and releases the first payout, then pays a new one
        assert Payout.objects.filter(seller=seller, creation_state="submitted").count() == 1
        assert len(fake.payouts) == 1
    finally:
        fake.release()
    ok(finish(slow))
    ok(run(env))
    live = Counter(t["metadata"]["payout_console_transfer"] for t in fake.transfers.values()
                   if not t["reversed"])
    assert len(fake.payouts) == 1, (
        f"{len(fake.payouts)} payouts at Stripe for one seller's money; our payouts: "
        f"{list(Payout.objects.values_list('reference', 'creation_state', 'status'))}")
    assert len(live) == len(txns), live
    assert PaymentTransaction.objects.filter(seller=seller, payed_out=True).count() == len(txns)


def test_without_api_key_refuses_and_dry_run_changes_nothing(
        fake: FakeStripe, test_database_url: str) -> None:
    seller, _ = seller_owed((1234, 766))
    no_key = server_env(test_database_url, STRIPE_API_BASE=fake.url)
    refused = run(no_key)
    assert refused.returncode != 0
    assert "STRIPE_API_KEY" in refused.stdout + refused.stderr
    empty_key = server_env(test_database_url, STRIPE_API_KEY="", STRIPE_API_BASE=fake.url)
    assert run(empty_key, "--seller", seller.stripe_account_id).returncode != 0

    dry = ok(run(no_key, "--dry-run"))
    assert seller.stripe_account_id in dry.stdout
    assert "20.00" in dry.stdout or "2000" in dry.stdout, dry.stdout  # 12.34 + 7.66

    assert fake.requests == []
    assert not Payout.objects.exists() and not PaymentTransfer.objects.exists()
    assert not PaymentTransaction.objects.filter(payed_out=True).exists()


def test_paid_webhook_before_phase_3_is_linked_and_kept(
        fake: FakeStripe, env: dict[str, str], inline_server: Server) -> None:
    seller, txns = seller_owed()
    fake.hold("/v1/payouts", when="after")
    running = start(env)
    try:
        held = fake.wait_held(timeout=RUN_S)
        assert held.response is not None
        stripe_id, reference = held.response["id"], held.params[METADATA]
        assert Payout.objects.get(reference=reference).stripe_payout_id is None

        answer = deliver(inline_server.url, paid_event(fake, stripe_id))
        assert answer.status == 200 and answer.json()["status"] == "processed", answer.body
        linked = Payout.objects.get(reference=reference)
        assert linked.stripe_payout_id == stripe_id
        assert linked.status == Payout.Status.PAID
        assert linked.creation_state == Payout.Creation.RESERVED
    finally:
        fake.release()
    ok(finish(running))
    payout = paid_once(fake, seller, txns)
    assert payout.stripe_payout_id == stripe_id
    assert payout.status == Payout.Status.PAID  # phase 3 did not move it back
    assert Payout.objects.count() == 1
    assert set(PaymentTransfer.objects.filter(payout_items__payout=payout)
               .values_list("status", flat=True)) == {PaymentTransfer.Status.PAID}


def test_a_payout_stripe_failed_meanwhile_is_recorded_without_its_status(
        fake: FakeStripe, env: dict[str, str], inline_server: Server) -> None:
    """Found by the lookup after Stripe failed it, with its event not arrived yet: taking
    Stripe's "failed" as is would strand the money (the event would then change nothing).
    The payout stays pending, marked for review; its payout.failed releases the money."""
    seller, txns, payout = crashed_after_stripe_made_the_payout(fake, env)
    [stripe_id] = fake.payouts
    fake.payouts[stripe_id].update(status="failed", failure_code="account_closed")
    age(payout, fake, 30)

    ok(run(env))

    payout.refresh_from_db()
    assert (payout.stripe_payout_id, payout.status) == (stripe_id, Payout.Status.PENDING)
    assert payout.creation_state == Payout.Creation.SUBMITTED
    assert "Stripe reports it failed" in payout.review_reason
    failed = stripe_events.payout_event("payout.failed", {
        **fake.payouts[stripe_id], "failure_message": "The bank account has been closed."},
        account=seller.stripe_account_id)
    assert deliver(inline_server.url, failed).json()["status"] == "processed"
    assert not PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns], payed_out=True)


@pytest.mark.parametrize("status", [400, 403, 404])
def test_a_lookup_that_fails_is_never_taken_for_a_refusal(fake: FakeStripe,
                                                          env: dict[str, str],
                                                          status: int) -> None:
    """A 4xx while listing what Stripe made (access revoked, ...) says nothing about the
    payout: nothing is reversed or released, and the payout stays reserved."""
    _, txns, payout = crashed_after_stripe_made_the_payout(fake, env)
    age(payout, fake, 30)
    fake.fail_next("/v1/transfers", status=status)

    result = run(env)

    assert result.returncode != 0
    assert "looking up what Stripe made" in result.stderr, result.stderr
    payout.refresh_from_db()
    assert payout.creation_state == Payout.Creation.RESERVED
    assert not fake.reversals and len(fake.payouts) == 1
    assert PaymentTransaction.objects.filter(pk__in=[t.pk for t in txns],
                                             payed_out=True).count() == len(txns)


def test_a_payout_its_webhook_linked_is_not_made_again(
        fake: FakeStripe, env: dict[str, str], inline_server: Server) -> None:
    """Stripe's payout carrying our reference was linked by its webhook while our payout
    was still reserved: the resume records the transfers and sends no payout request."""
    seller, _ = seller_owed()
    fake.fail_next("/v1/payouts", status=429)
    assert run(env).returncode != 0
    payout = Payout.objects.get(seller=seller)
    stripe_id = stripe_events.new_id("po")
    made = stripe_events.payout_object(stripe_id, status="in_transit", amount=payout.amount,
                                       metadata={"payout_console_payout": payout.reference})
    assert deliver(inline_server.url, stripe_events.payout_event(
        "payout.updated", made, account=seller.stripe_account_id)).json()["status"] == \
        "processed"
    seen = len(fake.requests)

    ok(run(env))

    assert not posts(fake, "/v1/payouts", seen)
    payout.refresh_from_db()
    assert (payout.stripe_payout_id, payout.status) == (stripe_id, Payout.Status.IN_TRANSIT)
    assert payout.creation_state == Payout.Creation.SUBMITTED
    assert PaymentTransfer.objects.filter(payout_items__payout=payout,
                                          stripe_transfer_id__isnull=True).count() == 0
