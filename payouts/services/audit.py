"""Recording what people did (``AuditEntry``): one call per action, after it ran."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser

from payouts.models import AuditEntry, Payout, WebhookEvent

Action = AuditEntry.Action


def payout_state(payout: Payout | None) -> dict[str, Any]:
    """What the audit keeps of a payout's state: enough to read "in transit → failed"."""
    if payout is None:
        return {}
    state: dict[str, Any] = {"status": payout.status}
    if payout.failure_code:
        state["failure_code"] = payout.failure_code
    if payout.reversed_at:
        state["reversed_by"] = payout.reversed_by
    if payout.review_reason:
        state["review"] = payout.review_reason
    return state


def describe_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The payout's state before → after, for people: "in_transit → failed, failure code
    account_closed"; "" when nothing changed or there is no payout."""
    if before == after or not after:
        return ""
    status = after["status"]
    if before.get("status") != status:
        status = f"{before.get('status', '—')} → {status}"
    marks = [status]
    if after.get("failure_code"):
        marks.append(f"failure code {after['failure_code']}")
    if after.get("reversed_by"):
        marks.append(f"reversed by {after['reversed_by']}")
    if after.get("review"):
        marks.append(f"to review: {after['review']}")
    for key, cleared in (("review", "review cleared"), ("failure_code", "failure code cleared")):
        if before.get(key) and not after.get(key):
            marks.append(cleared)
    return ", ".join(marks)


def payout_of(event: WebhookEvent) -> Payout | None:
    if not event.stripe_object_id:
        return None
    return Payout.objects.filter(stripe_payout_id=event.stripe_object_id).first()


def record(action: str, *, actor: AbstractBaseUser | None, target: str, outcome: str,
           detail: str = "", event: WebhookEvent | None = None, payout: Payout | None = None,
           before: dict[str, Any] | None = None) -> AuditEntry:
    """Store one entry; ``after`` is read from ``payout`` now, ``before`` was read by the
    caller before it acted."""
    if payout is not None:
        payout.refresh_from_db()
    return AuditEntry.objects.create(
        actor=actor, actor_name=actor.get_username() if actor else "system", action=action,
        target=target, event=event, payout=payout, outcome=outcome, detail=detail,
        before=before or {}, after=payout_state(payout))
