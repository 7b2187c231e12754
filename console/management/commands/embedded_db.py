from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from console import embedded_db


class Command(BaseCommand):
    help = "Start, stop or inspect this checkout's embedded PostgreSQL (DATABASE_URL=embedded)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["status", "start", "stop", "url"])

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        if settings.DATABASES["default"]["ENGINE"] != "console.db_backend":
            raise CommandError("DATABASE_URL is not `embedded`: the embedded server is not in use")
        server = embedded_db.for_checkout()
        database = settings.DATABASES["default"]["NAME"]
        try:
            if action == "start":
                server.ensure_running(database=database)
                self.stdout.write(f"running on {server.host}:{server.port} ({server.pgdata})")
            elif action == "stop":
                stopped = server.stop()
                self.stdout.write("stopped" if stopped else "was not running")
            elif action == "url":
                self.stdout.write(server.url(database))
            else:
                port = server.running_port()
                state = f"running on {server.host}:{port}" if port else "stopped"
                self.stdout.write(f"{state}; configured port {server.port}; data {server.pgdata}")
        except embedded_db.EmbeddedDatabaseError as exc:
            raise CommandError(str(exc)) from exc
