"""The two staff roles, as groups: Support (view everything, replay) and Managers (view, health)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

VIEW = ["view_seller", "view_paymenttransaction", "view_paymenttransfer", "view_payout",
        "view_payoutitem", "view_webhookevent", "view_webhookeventattempt",
        "view_webhookrejection", "view_transactionlog", "view_health"]
ROLES = {
    "Support": [*VIEW, "replay_webhookevent"],
    "Managers": VIEW,
}


def create_roles(apps, schema_editor):
    # Permissions are normally created after all migrations; these groups need them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, codenames in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        permissions = Permission.objects.filter(content_type__app_label="payouts",
                                                codename__in=codenames)
        assert permissions.count() == len(codenames), f"missing permissions for {name}"
        group.permissions.set(permissions)


def remove_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("payouts", "0002_permissions"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]
    operations = [migrations.RunPython(create_roles, remove_roles)]
