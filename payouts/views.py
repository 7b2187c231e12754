"""POST /webhooks/stripe/: verify, store once, answer at once (then process inline, if so set).

The answer never depends on processing: once the event is stored it is 200,
whatever happens next; the inbox owns retries.
"""

import structlog
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from payouts.models import WebhookEventAttempt
from payouts.services import inbox
from payouts.services.processing import event_process

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

    inline = settings.WEBHOOK_PROCESSING == "inline"
    try:
        recorded = inbox.event_record(payload, body, inbox.sanitised_headers(request.headers),
                                      lease_s=settings.WEBHOOK_LEASE_SECONDS if inline else 0)
    except DatabaseError:
        # Not stored, so not acknowledged: Stripe delivers it again later.
        log.exception("webhook.store_failed", stripe_event=payload["id"])
        return JsonResponse({"error": "unavailable", "detail": "the event could not be "
                             "stored; it will be accepted when redelivered"}, status=503)
    log.info("webhook.received", stripe_event=payload["id"], type=payload["type"],
             duplicate=recorded.duplicate)
    answer = {"received": True, "duplicate": recorded.duplicate}
    if inline and recorded.event_id is not None:
        try:  # stored and committed: nothing from here on may turn into a 5xx
            outcome = event_process(event_id=recorded.event_id,
                                    trigger=WebhookEventAttempt.Trigger.INLINE,
                                    nowait=True, payload=payload)
            answer["status"] = outcome.status_after
        except Exception:
            log.exception("webhook.inline_processing_crashed", stripe_event=payload["id"])
    return JsonResponse(answer)
