"""Real receivers for alert deliveries: an HTTP server and an SMTP server (aiosmtpd) on
127.0.0.1, each recording what reached it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.payouts.helpers import free_port


class Receiver:
    """A Slack-like incoming webhook: records each JSON body; ``failing`` answers 500,
    ``hanging`` answers only after ``hang_s``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.failing = False
        self.hang_s = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.hang_s:
                    time.sleep(receiver.hang_s)
                if receiver.failing:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.bodies.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def texts(self) -> list[str]:
        return [body["text"] for body in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """aiosmtpd's handler: every message accepted, kept parsed."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content)
        message["X-Rcpt"] = ",".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 OK"

    @property
    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.messages]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    mailbox.port = controller.port  # type: ignore[attr-defined]
    yield mailbox
    controller.stop()


@pytest.fixture
def delivering(settings: Any, receiver: Receiver, mailbox: Mailbox) -> None:
    """Alerts go to the local receiver and, through Django's SMTP backend, to aiosmtpd."""
    settings.ALERT_WEBHOOK_URL = receiver.url
    settings.ALERT_EMAILS = ["oncall@example.com", "lead@example.com"]
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = mailbox.port  # type: ignore[attr-defined]
    settings.ALERT_TIMEOUT_SECONDS = 2
    settings.EMAIL_TIMEOUT = 2
