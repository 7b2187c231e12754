from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand
from django.db import transaction

# Demo logins for a local console; `make run` prints them. Never used outside DEBUG demos.
DEMO_USERS = [
    # username, password, superuser
    ("admin", "admin-demo-password", True),
]


class Command(BaseCommand):
    help = "Load the deterministic demo data and demo logins (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            for username, password, superuser in DEMO_USERS:
                user, _ = User.objects.get_or_create(username=username)
                user.is_staff = user.is_superuser = superuser
                user.set_password(password)
                user.save()
        self.stdout.write("Demo logins (local demo only):")
        for username, password, superuser in DEMO_USERS:
            role = "superuser" if superuser else "staff"
            self.stdout.write(f"  {username} / {password}  ({role})")
