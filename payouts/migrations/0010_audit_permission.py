"""Both roles read the audit trail: view_auditentry added to them (see payouts/roles.py)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

from payouts.roles import ROLES, ensure_roles


def grant(apps, schema_editor):
    # view_auditentry is created after all migrations otherwise (0009 added its model).
    app_config = apps.get_app_config("payouts")
    app_config.models_module = True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = None
    ensure_roles(apps.get_model("auth", "Group"), apps.get_model("auth", "Permission"))


def revoke(apps, schema_editor):
    Permission = apps.get_model("auth", "Permission")
    audit = Permission.objects.filter(content_type__app_label="payouts",
                                      codename="view_auditentry")
    for group in apps.get_model("auth", "Group").objects.filter(name__in=ROLES):
        group.permissions.remove(*audit)


class Migration(migrations.Migration):
    dependencies = [("payouts", "0009_audit")]
    operations = [migrations.RunPython(grant, revoke)]
