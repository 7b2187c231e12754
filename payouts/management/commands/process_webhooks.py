import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from payouts.worker import Worker


class Command(BaseCommand):
    help = "Process stored webhook events: claim due ones (SKIP LOCKED), apply, retry with backoff."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true",
                            help="process what is due now, then exit")
        parser.add_argument("--batch-size", type=int, default=1,
                            help="events leased per claim (a crash delays them all)")
        parser.add_argument("--idle-sleep", type=float, default=0.5,
                            help="seconds to wait when nothing is due")

    def handle(self, *args: Any, once: bool, batch_size: int, idle_sleep: float,
               **options: Any) -> None:
        worker = Worker(batch_size=batch_size, idle_sleep_s=idle_sleep)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: worker.stop())
        handled = worker.run(once=once)
        self.stdout.write(f"processed {handled} event(s)")
