"""The two staff roles, as groups: Support (view everything, replay) and Managers (view, health).

Used by the data migration that creates them and by `seed_demo` (which restores
them after a `flush`). Models are passed in so the migration can use its
historical ones.
"""

from typing import Any

VIEW = ["view_seller", "view_paymenttransaction", "view_paymenttransfer", "view_payout",
        "view_payoutitem", "view_webhookevent", "view_webhookeventattempt",
        "view_webhookrejection", "view_transactionlog", "view_health"]
ROLES = {
    "Support": [*VIEW, "replay_webhookevent"],
    "Managers": VIEW,
}


def ensure_roles(group_model: Any, permission_model: Any) -> None:
    for name, codenames in ROLES.items():
        group, _ = group_model.objects.get_or_create(name=name)
        permissions = permission_model.objects.filter(content_type__app_label="payouts",
                                                      codename__in=codenames)
        if permissions.count() != len(codenames):
            raise RuntimeError(f"permissions missing for the {name} role; run migrate")
        group.permissions.set(permissions)
