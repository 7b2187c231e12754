"""Settings, read from the environment (see the README's configuration table)."""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from console import embedded_db, log_config

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DJANGO_DEBUG", False)
# The fallback is for development only; `manage.py check --deploy` flags it.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or "django-insecure-dev-only-set-DJANGO_SECRET_KEY"
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")

# Stripe signs each delivery with the endpoint secret; several are accepted
# while a secret is being rolled. In DEBUG (the local demo) a fixed, public
# development secret is the default, so `stripe_trigger` and the server agree.
DEV_WEBHOOK_SECRET = "whsec_dev_only_payout_console_not_a_real_secret"
STRIPE_WEBHOOK_SECRETS = env_list("STRIPE_WEBHOOK_SECRET") or (
    [DEV_WEBHOOK_SECRET] if DEBUG else []
)
# Creating transfers and payouts (create_payouts) calls Stripe's API with this key.
STRIPE_API_KEY = os.environ.get("STRIPE_API_KEY", "")
STRIPE_API_BASE = os.environ.get("STRIPE_API_BASE") or "https://api.stripe.com"
# Each request's timeout; reads (never writes) are retried up to STRIPE_READ_ATTEMPTS
# times within STRIPE_READ_DEADLINE_SECONDS.
STRIPE_TIMEOUT_SECONDS = float(os.environ.get("STRIPE_TIMEOUT_SECONDS", "20"))
STRIPE_READ_ATTEMPTS = int(os.environ.get("STRIPE_READ_ATTEMPTS", "5"))
STRIPE_READ_DEADLINE_SECONDS = float(os.environ.get("STRIPE_READ_DEADLINE_SECONDS", "60"))
# Stripe as the source of truth, run by the workers when STRIPE_API_KEY is set: missed
# events listed from the Events API, and payouts compared with Stripe's.
SYNC_EVENTS_MINUTES = float(os.environ.get("SYNC_EVENTS_MINUTES", "15"))
SYNC_EVENTS_DAYS = int(os.environ.get("SYNC_EVENTS_DAYS", "3"))  # how far back each run lists
if not 1 <= SYNC_EVENTS_DAYS <= 30:
    raise ImproperlyConfigured("SYNC_EVENTS_DAYS must be 1 to 30: Stripe keeps events 30 days")
RECONCILE_MINUTES = float(os.environ.get("RECONCILE_MINUTES", "60"))
# A live deployment ignores test-mode events, and a test deployment live ones.
STRIPE_LIVEMODE = env_bool("STRIPE_LIVEMODE", False)

# inline: process right after the event is stored, in the request; deferred:
# only store, and leave processing to `manage.py process_webhooks`.
WEBHOOK_PROCESSING = os.environ.get("WEBHOOK_PROCESSING", "inline")
if WEBHOOK_PROCESSING not in {"inline", "deferred"}:
    raise ImproperlyConfigured("WEBHOOK_PROCESSING must be 'inline' or 'deferred'")
# An event that fails (e.g. waits for its payout) is given up (dead) only once it has had
# WEBHOOK_MAX_ATTEMPTS attempts AND the horizon has passed since it was received: Stripe
# redelivers for 3 days, so what it waits for can come that late.
WEBHOOK_MAX_ATTEMPTS = int(os.environ.get("WEBHOOK_MAX_ATTEMPTS", "10"))
WEBHOOK_RETRY_HORIZON_HOURS = float(os.environ.get("WEBHOOK_RETRY_HORIZON_HOURS", "72"))
WEBHOOK_RETRY_BASE_SECONDS = float(os.environ.get("WEBHOOK_RETRY_BASE_SECONDS", "30"))
WEBHOOK_RETRY_MAX_SECONDS = float(os.environ.get("WEBHOOK_RETRY_MAX_SECONDS", "21600"))
# How long a worker (or the inline request) owns a claimed event before another may take it.
WEBHOOK_LEASE_SECONDS = float(os.environ.get("WEBHOOK_LEASE_SECONDS", "60"))

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "django_htmx",
    "django_tables2",
    "django_filters",
    "template_partials",
    "payouts",
    "console",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "payouts.middleware.WebhookFastPath",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "console.urls"
WSGI_APPLICATION = "console.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database ---------------------------------------------------------------
# DATABASE_URL points at any PostgreSQL; without it, the checkout's embedded
# server (console/embedded_db.py) is started on first use.
if os.environ.get("DATABASE_URL"):
    DATABASES = {
        "default": dj_database_url.parse(
            os.environ["DATABASE_URL"], conn_max_age=60, conn_health_checks=True
        )
    }
else:
    _embedded = embedded_db.for_checkout()
    DATABASES = {
        "default": {
            "ENGINE": "console.db_backend",
            "NAME": "payout_console",
            "USER": embedded_db.SUPERUSER,
            "HOST": _embedded.host,
            "PORT": _embedded.port,
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Served by WhiteNoise straight from the finders: no collectstatic step, no STATIC_ROOT.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
X_FRAME_OPTIONS = "DENY"

LOGGING = log_config.configure(
    log_format=os.environ.get("LOG_FORMAT", "console"),
    level=os.environ.get("LOG_LEVEL", "INFO"),
)
