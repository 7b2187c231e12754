"""structlog set up once, with standard-library logging routed through it.

Every log line is a key-value event: human-readable on a terminal
(LOG_FORMAT=console), one JSON object per line in production (LOG_FORMAT=json).
"""

from typing import Any

import structlog

_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(log_format: str, level: str) -> dict[str, Any]:
    """Configure structlog and return the matching Django LOGGING dict."""
    if log_format not in {"console", "json"}:
        raise ValueError(f"LOG_FORMAT must be 'console' or 'json', not {log_format!r}")
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        final = [structlog.processors.dict_tracebacks, renderer]
    else:
        final = [structlog.dev.ConsoleRenderer()]

    structlog.configure(
        processors=[
            # Drop a disabled level first, before any work is done for it.
            structlog.stdlib.filter_by_level,
            *_SHARED_PROCESSORS,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": structlog.stdlib.ProcessorFormatter,
                "foreign_pre_chain": _SHARED_PROCESSORS,
                "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
            },
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "structlog"},
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # Django logs every 4xx as a warning; our views log their own, richer events.
            "django.request": {"level": "ERROR"},
            # stripe-python logs every request and error at INFO; ours (stripe.read_failed,
            # job.*) say what matters, with the request id.
            "stripe": {"level": "WARNING"},
        },
    }
