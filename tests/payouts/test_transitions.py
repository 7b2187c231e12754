"""The transition table and event ordering of payouts/transitions.py (pure, no database)."""

from datetime import UTC, datetime, timedelta

import pytest

from payouts import transitions
from payouts.transitions import CANCELED, FAILED, IN_TRANSIT, PAID, PENDING, Decision, decide

STATUSES = (PENDING, IN_TRANSIT, PAID, FAILED, CANCELED)
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

# Written out independently of transitions.ALLOWED: the contract in docs/design.md, section 3.
EXPECTED_ALLOWED = {
    (PENDING, IN_TRANSIT), (PENDING, PAID), (PENDING, FAILED), (PENDING, CANCELED),
    (IN_TRANSIT, PAID), (IN_TRANSIT, FAILED), (IN_TRANSIT, CANCELED),
    (PAID, FAILED),
}
CHANGING_PAIRS = [(a, b) for a in STATUSES for b in STATUSES if a != b]


def newer_event(current: str, new: str, **overrides: object) -> Decision:
    """decide() for an event newer than the last one applied, unless overridden."""
    arguments: dict[str, object] = {
        "current_status": current, "last_event_id": "evt_last", "last_event_created": T0,
        "event_id": "evt_new", "event_created": T0 + timedelta(seconds=10), "new_status": new,
    }
    arguments.update(overrides)
    return decide(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(("current", "new"), CHANGING_PAIRS)
def test_every_status_change_follows_the_table(current, new):
    """Each of the 20 status changes is allowed or refused exactly as the design says."""
    decision = newer_event(current, new)
    assert decision.apply is ((current, new) in EXPECTED_ALLOWED)
    if decision.apply:
        assert decision.reason == f"{current} → {new}"
    elif current in (FAILED, CANCELED):
        assert decision.reason == f"payout is {current}, a final status"
    else:
        assert decision.reason == f"no transition {current} → {new}"


def test_the_allowed_table_matches_the_design():
    """transitions.ALLOWED holds exactly the design's pairs, and nothing for other statuses."""
    pairs = {(a, b) for a, targets in transitions.ALLOWED.items() for b in targets}
    assert pairs == EXPECTED_ALLOWED
    assert set(transitions.ALLOWED) == set(STATUSES)


@pytest.mark.parametrize("final", [FAILED, CANCELED])
@pytest.mark.parametrize("new", [PENDING, IN_TRANSIT, PAID])
def test_final_statuses_never_move_on(final, new):
    """failed and canceled are final: no newer event moves them to another status."""
    assert frozenset({FAILED, CANCELED}) == transitions.FINAL
    decision = newer_event(final, new)
    assert decision == Decision(False, f"payout is {final}, a final status")


@pytest.mark.parametrize("status", STATUSES)
def test_a_newer_event_with_the_same_status_applies(status):
    """A newer event that keeps the status applies (it may carry new data), final ones too."""
    assert newer_event(status, status) == Decision(True, "no status change")


@pytest.mark.parametrize(("current", "new"), [*sorted(EXPECTED_ALLOWED), (PAID, PAID)])
def test_an_older_event_is_skipped_naming_the_newer_one(current, new):
    """An event created before the newest applied one is skipped, whatever its status."""
    decision = newer_event(current, new, last_event_id="evt_newest_applied",
                           event_created=T0 - timedelta(seconds=1))
    assert decision.apply is False
    assert decision.reason == "older than the newest applied event evt_newest_applied"


@pytest.mark.parametrize("created_offset", [-60, 0, 60])
@pytest.mark.parametrize(("current", "new"), [(IN_TRANSIT, PAID), (PAID, PAID), (FAILED, PAID)])
def test_the_same_event_id_is_already_applied(current, new, created_offset):
    """The event applied last, seen again, is 'already applied', whatever its time or status."""
    decision = newer_event(current, new, last_event_id="evt_same", event_id="evt_same",
                           event_created=T0 + timedelta(seconds=created_offset))
    assert decision == Decision(False, "already applied")


@pytest.mark.parametrize(("current", "new", "applies"), [
    (PENDING, IN_TRANSIT, True),
    (IN_TRANSIT, PAID, True),
    (PAID, FAILED, True),
    (PAID, IN_TRANSIT, False),
    (FAILED, PAID, False),
])
def test_equal_created_times_are_decided_by_the_table(current, new, applies):
    """An event created in the same second as the newest applied one is not 'older':
    between different statuses the transition table decides."""
    decision = newer_event(current, new, event_created=T0)
    assert decision.apply is applies
    assert not decision.reason.startswith("older")
    assert decision.review is False


@pytest.mark.parametrize("status", STATUSES)
def test_same_second_same_status_changes_nothing_and_asks_for_review(status):
    """Same second, same status, another event: which is newer cannot be told, so the
    applied one stays and the payout is marked for review."""
    decision = newer_event(status, status, event_created=T0)
    assert decision == Decision(
        False, "same second and status as the applied event evt_last; payout marked for "
        "review", review=True)


def test_a_later_event_with_the_same_status_still_applies():
    """One second later, the same status is news (arrival date, metadata): applied."""
    decision = newer_event(PAID, PAID, event_created=T0 + timedelta(seconds=1))
    assert decision == Decision(True, "no status change")


def test_equal_created_paid_and_failed_end_failed_in_either_order():
    """payout.paid and payout.failed in the same second: failed wins whichever comes first."""
    paid_first = newer_event(IN_TRANSIT, PAID, event_created=T0)
    then_failed = newer_event(PAID, FAILED, event_created=T0)
    failed_first = newer_event(IN_TRANSIT, FAILED, event_created=T0)
    then_paid = newer_event(FAILED, PAID, event_created=T0)
    assert (paid_first.apply, then_failed.apply) == (True, True)
    assert (failed_first.apply, then_paid.apply) == (True, False)


@pytest.mark.parametrize("status", STATUSES)
def test_the_first_event_for_a_payout_is_never_older(status):
    """With no event applied yet (no last created time), any valid transition applies."""
    decision = newer_event(PENDING, status, last_event_id="", last_event_created=None,
                           event_created=T0 - timedelta(days=365))
    assert decision.apply is True


@pytest.mark.parametrize("current", STATUSES)
@pytest.mark.parametrize("unknown", ["reversed", "returned", "", "PAID"])
def test_an_unknown_status_from_stripe_is_refused(current, unknown):
    """A status string outside Stripe's five is never written onto a payout."""
    decision = newer_event(current, unknown)
    assert decision.apply is False
    if current in (FAILED, CANCELED):
        assert decision.reason == f"payout is {current}, a final status"
    else:
        assert decision.reason == f"no transition {current} → {unknown}"


@pytest.mark.parametrize(("event_type", "object_status", "expected"), [
    ("payout.paid", "in_transit", PAID),
    ("payout.failed", "paid", FAILED),
    ("payout.canceled", "pending", CANCELED),
    ("payout.updated", "in_transit", IN_TRANSIT),
    ("payout.updated", "failed", FAILED),
    ("payout.created", "pending", PENDING),
    ("payout.updated", "brand_new_status", "brand_new_status"),
])
def test_target_status_comes_from_the_type_or_the_object(event_type, object_status, expected):
    """paid/failed/canceled events name their status; created/updated take the object's."""
    assert transitions.target_status(event_type, object_status) == expected


def test_handled_types_are_the_five_payout_events():
    """Only payout.created/updated/paid/failed/canceled are handled."""
    handled = {"payout.created", "payout.updated", "payout.paid", "payout.failed",
               "payout.canceled"}
    assert handled == transitions.HANDLED_TYPES
    assert "payout.reconciliation_completed" not in transitions.HANDLED_TYPES
