"""The two staff roles, as groups: Support (view everything, replay) and Managers (view, health).

Both read the audit trail (view_auditentry). A change here needs a data migration that
runs ``ensure_roles`` again (as 0010_audit_permission does), or existing groups keep the
old list.

Used by the data migration that creates them and by `seed_demo` (which restores
them after a `flush`). Models are passed in so the migration can use its
historical ones.
"""

from typing import Any

VIEW = ["view_seller", "view_paymenttransaction", "view_paymenttransfer", "view_payout",
        "view_payoutitem", "view_webhookevent", "view_webhookeventattempt",
        "view_webhookrejection", "view_transactionlog", "view_health", "view_auditentry"]
ROLES = {
    "Support": [*VIEW, "replay_webhookevent"],
    "Managers": VIEW,
}


def ensure_roles(group_model: Any, permission_model: Any,
                 roles: dict[str, list[str]] = ROLES) -> None:
    """Each role's group with exactly its permissions. ``roles``: an older migration passes
    the roles as they were then, since a newer model's permissions do not exist yet."""
    for name, codenames in roles.items():
        group, _ = group_model.objects.get_or_create(name=name)
        permissions = permission_model.objects.filter(content_type__app_label="payouts",
                                                      codename__in=codenames)
        if permissions.count() != len(codenames):
            raise RuntimeError(f"permissions missing for the {name} role; run migrate")
        group.permissions.set(permissions)
