"""The two staff roles, as groups (see payouts/roles.py)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

from payouts.roles import ROLES, ensure_roles

# The roles as this migration made them: later permissions (view_auditentry, 0010) have no
# model yet at this point of a fresh migrate.
ROLES_THEN = {name: [c for c in codenames if c != "view_auditentry"]
              for name, codenames in ROLES.items()}


def create_roles(apps, schema_editor):
    # Permissions are normally created after all migrations; these groups need them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    ensure_roles(apps.get_model("auth", "Group"), apps.get_model("auth", "Permission"),
                 ROLES_THEN)


def remove_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("payouts", "0002_permissions"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]
    operations = [migrations.RunPython(create_roles, remove_roles)]
