"""POST /webhooks/stripe/: verify, store once, answer at once (applying it first, inline).

The answer never depends on processing: once the event is stored it is 200,
whatever happens next; the inbox owns retries.
"""

import structlog
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from payouts.services import inbox
from payouts.services.processing import event_receive

log = structlog.get_logger(__name__)


def _refuse(request: HttpRequest, rejection: inbox.Rejected) -> JsonResponse:
    inbox.rejection_count(rejection.reason)
    log.warning("webhook.rejected", reason=rejection.reason, detail=rejection.detail,
                status=rejection.status, remote_addr=request.META.get("REMOTE_ADDR"))
    return JsonResponse({"error": rejection.reason, "detail": rejection.detail},
                        status=rejection.status)


@csrf_exempt
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        response = _refuse(request, inbox.Rejected("method_not_allowed", "use POST", status=405))
        response["Allow"] = "POST"
        return response
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > inbox.MAX_BODY_BYTES:
        return _refuse(request, inbox.Rejected("too_large", "the body is over 1 MiB", status=413))
    body = request.read(inbox.MAX_BODY_BYTES + 1)
    if len(body) > inbox.MAX_BODY_BYTES:
        return _refuse(request, inbox.Rejected("too_large", "the body is over 1 MiB", status=413))

    try:
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
        return JsonResponse({"error": "unavailable", "detail": "the event could not be "
                             "stored; it will be accepted when redelivered"}, status=503)
    log.info("webhook.received", stripe_event=payload["id"], type=payload["type"],
             duplicate=answer["duplicate"], status=answer.get("status"))
    return JsonResponse(answer)
