from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Payout console"


@checks.register(checks.Tags.security, deploy=True)
def proxy_addresses(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    """Behind a TLS proxy every connection comes from the proxy: without
    TRUSTED_PROXY_COUNT, ten wrong passwords from anywhere lock a username out for all."""
    if settings.SECURE_PROXY_SSL_HEADER and settings.TRUSTED_PROXY_COUNT <= 0:
        return [checks.Warning(
            "DJANGO_SECURE_PROXY_SSL_HEADER is set but TRUSTED_PROXY_COUNT is 0: login "
            "lockouts would count every client as the proxy's address.",
            hint="Set TRUSTED_PROXY_COUNT to the number of proxies that append to "
                 "X-Forwarded-For.", id="console.W001")]
    return []
