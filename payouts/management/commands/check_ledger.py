"""Check the ledger's money invariants over the whole database (payouts/invariants.py)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from payouts.invariants import ledger_violations


class Command(BaseCommand):
    help = ("Check the money invariants over the whole ledger and print each violation with "
            "its ids; exit 1 when there is any.")

    def handle(self, *args: Any, **options: Any) -> None:
        violations = ledger_violations()
        for violation in violations:
            self.stdout.write(f"{violation.check}: {violation.message}")
        if violations:
            raise CommandError(f"{len(violations)} violation(s) of the ledger's invariants",
                               returncode=1)
        self.stdout.write("ledger ok: every money invariant holds")
