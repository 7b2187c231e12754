"""POST /webhooks/stripe/: verify, store once, answer at once (applying it first, inline).

The answer never depends on processing: once the event is stored it is 200,
whatever happens next; the inbox owns retries.
"""

from typing import Any

import structlog
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from payouts import metrics
from payouts.services import inbox
from payouts.services.processing import event_receive

log = structlog.get_logger(__name__)


def _refuse(request: HttpRequest, rejection: inbox.Rejected) -> JsonResponse:
    inbox.rejection_count(rejection.reason)
    metrics.delivery("rejected", rejection.reason)
    log.warning("webhook.rejected", reason=rejection.reason, detail=rejection.detail,
                status=rejection.status, remote_addr=request.META.get("REMOTE_ADDR"))
    return JsonResponse({"error": rejection.reason, "detail": rejection.detail},
                        status=rejection.status)


def _too_large() -> inbox.Rejected:
    return inbox.Rejected("too_large", "the body is over 1 MiB", status=413)


def _body(request: HttpRequest) -> bytes:
    """The request body, at most MAX_BODY_BYTES; ``Rejected`` if it cannot be had.

    With Content-Length, Django reads that many bytes. A chunked body has no length:
    Django would read nothing (and the signature would then fail on an empty body), so it
    is read from the server's input stream to its end when the server says that stream
    ends with the body (``wsgi.input_terminated``: gunicorn does), else refused with 411.
    """
    meta = request.META
    if meta.get("CONTENT_LENGTH"):
        try:
            declared = int(meta["CONTENT_LENGTH"])
        except ValueError:
            declared = 0
        if declared > inbox.MAX_BODY_BYTES:
            raise _too_large()
        body = request.read(inbox.MAX_BODY_BYTES + 1)
    elif "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower():
        if not meta.get("wsgi.input_terminated"):
            raise inbox.Rejected("length_required", "this server cannot read a chunked body: "
                                 "send Content-Length", status=411)
        body = _read_chunked(meta["wsgi.input"], inbox.MAX_BODY_BYTES + 1)
    else:
        body = request.read(inbox.MAX_BODY_BYTES + 1)  # no body
    if len(body) > inbox.MAX_BODY_BYTES:
        raise _too_large()
    return body


def _read_chunked(stream: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes of a chunked body: the stream returns b"" at its end."""
    parts: list[bytes] = []
    size = 0
    try:
        while size < limit:
            part = stream.read(min(64 * 1024, limit - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    except Exception:  # the server's reader on broken framing (gunicorn: InvalidChunkSize, ...)
        raise inbox.Rejected("unreadable_body", "the chunked body is malformed") from None
    return b"".join(parts)


@csrf_exempt
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        response = _refuse(request, inbox.Rejected("method_not_allowed", "use POST", status=405))
        response["Allow"] = "POST"
        return response
    try:
        body = _body(request)
        payload = inbox.verify_delivery(body, request.headers.get("Stripe-Signature"),
                                        settings.STRIPE_WEBHOOK_SECRETS)
    except inbox.Rejected as rejection:
        return _refuse(request, rejection)

    headers = inbox.sanitised_headers(request.headers)
    answer: dict[str, object]
    try:
        if settings.WEBHOOK_PROCESSING == "inline":
            received = event_receive(payload, body, headers)
            answer = {"received": True, "duplicate": received.duplicate}
            if received.outcome is not None:
                answer["status"] = received.outcome.status_after
        else:
            recorded = inbox.event_record(payload, body, headers, lease_s=0)
            answer = {"received": True, "duplicate": recorded.duplicate}
    except DatabaseError:
        # Not stored, so not acknowledged: Stripe delivers it again later.
        log.exception("webhook.store_failed", stripe_event=payload["id"])
        metrics.delivery("unavailable")
        return JsonResponse({"error": "unavailable", "detail": "the event could not be "
                             "stored; it will be accepted when redelivered"}, status=503)
    metrics.delivery("duplicate" if answer["duplicate"] else "received")
    log.info("webhook.received", stripe_event=payload["id"], type=payload["type"],
             duplicate=answer["duplicate"], status=answer.get("status"))
    return JsonResponse(answer)
