"""Settings, read from the environment (see the README's configuration table)."""

import os
from pathlib import Path

import dj_database_url
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

from console import embedded_db, log_config

BASE_DIR = Path(__file__).resolve().parent.parent


def read_env_file(path: str) -> None:
    """Fill unset environment variables from ``path`` (``KEY=value`` lines, ``#``
    comments, also after a value; quotes keep a value whole); a real environment
    variable always wins. A few lines instead of a
    dependency: the file is the one `make run` writes for the demo."""
    if not path:
        return
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if value[:1] in ("'", '"'):  # quoted: taken as written, comment and all
            value = value[1:].partition(value[0])[0]
        else:  # as in shell and dotenv files, " #" starts a comment
            value = value.partition(" #")[0].strip()
        os.environ.setdefault(key.strip(), value)


# The demo checkout's choices (DJANGO_DEBUG, DATABASE_URL=embedded, its secret key), so
# commands typed by hand there behave like `make run`. DJANGO_ENV_FILE= (empty) reads none.
read_env_file(os.environ.get("DJANGO_ENV_FILE", str(BASE_DIR / ".env")))


def env_bool(name: str, default: bool) -> bool:
    """A yes/no setting. Anything but a known spelling is refused: a typo must not turn
    HTTPS or live mode off quietly."""
    value = (os.environ.get(name) or "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false (1/0, yes/no, on/off), "
                               f"not {os.environ[name]!r}")


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DJANGO_DEBUG", False)
# Fail closed: without DEBUG there is no fallback key (a known key forges sessions).
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set, and DJANGO_DEBUG is off: set it to a long random "
            "value, e.g. from python -c 'import secrets; print(secrets.token_urlsafe(50))'")
    SECRET_KEY = "django-insecure-dev-only-set-DJANGO_SECRET_KEY"
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
if STRIPE_LIVEMODE and DEV_WEBHOOK_SECRET in STRIPE_WEBHOOK_SECRETS:
    # The development secret is in the repository: anyone could sign live deliveries.
    raise ImproperlyConfigured(
        "STRIPE_LIVEMODE is on, but the webhook secret is the public development secret "
        "(DJANGO_DEBUG's default): set STRIPE_WEBHOOK_SECRET to the endpoint's signing secret")
# A live bulk replay of more events than this waits for a second Support person's approval.
_threshold = os.environ.get("BULK_REPLAY_APPROVAL_THRESHOLD", "").strip() or "50"
if not _threshold.isdigit():
    raise ImproperlyConfigured("BULK_REPLAY_APPROVAL_THRESHOLD must be a whole number of "
                               f"events (0 or more), not {_threshold!r}")
BULK_REPLAY_APPROVAL_THRESHOLD = int(_threshold)

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
# Refused deliveries are counted in memory and added to their table this often, per
# process (0: one write per refusal). payouts/services/inbox.py, RejectionCounter.
WEBHOOK_REJECTION_FLUSH_SECONDS = float(os.environ.get("WEBHOOK_REJECTION_FLUSH_SECONDS", "5"))
# Health's verdict (console/verdict.py): degraded when the oldest due event has waited
# longer than this; needs attention when processing p99 over 24 h is above this.
HEALTH_OLDEST_DUE_SECONDS = float(os.environ.get("HEALTH_OLDEST_DUE_SECONDS", "300"))
HEALTH_P99_SECONDS = float(os.environ.get("HEALTH_P99_SECONDS", "1"))


def env_number(name: str, default: str, *, minimum: float = 0, whole: bool = False) -> float:
    """A number setting, refused with its name when it is not one (or below ``minimum``)."""
    raw = os.environ.get(name, "").strip() or default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ImproperlyConfigured(f"{name} must be {kind}, not {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {raw!r}")
    return value


# Alerts (payouts/services/alerts.py; the rules shared with Health are in payouts/rules.py).
# The worker checks them every ALERT_CHECK_MINUTES; each opens once, resolves once.
ALERT_CHECK_MINUTES = env_number("ALERT_CHECK_MINUTES", "1", minimum=0.05)
ALERT_DEAD_EVENTS = int(env_number("ALERT_DEAD_EVENTS", "0", whole=True))
ALERT_STUCK_GRACE_HOURS = env_number("ALERT_STUCK_GRACE_HOURS", "24")
ALERT_FAILURE_WINDOW_HOURS = env_number("ALERT_FAILURE_WINDOW_HOURS", "24", minimum=0.1)
ALERT_FAILURE_RATE = env_number("ALERT_FAILURE_RATE", "0.2")
if ALERT_FAILURE_RATE > 1:
    raise ImproperlyConfigured("ALERT_FAILURE_RATE is a share, 0 to 1 (0.2: 20 %), "
                               f"not {ALERT_FAILURE_RATE}")
ALERT_FAILURE_MIN_COUNT = int(env_number("ALERT_FAILURE_MIN_COUNT", "5", minimum=1, whole=True))
ALERT_REJECTIONS = int(env_number("ALERT_REJECTIONS", "20", minimum=1, whole=True))
ALERT_REJECTION_WINDOW_MINUTES = int(env_number("ALERT_REJECTION_WINDOW_MINUTES", "5",
                                                minimum=1, whole=True))
ALERT_API_VERSION_HOURS = env_number("ALERT_API_VERSION_HOURS", "24", minimum=0.1)
# The API version our webhook endpoint is pinned to; events of another one are alerted.
STRIPE_API_VERSION = os.environ.get("STRIPE_API_VERSION", "").strip() or "2025-09-30.clover"
# Where alerts go: a Slack-compatible incoming webhook ({"text": ...}) and/or e-mail.
ALERT_WEBHOOK_URL = os.environ.get("ALERT_WEBHOOK_URL", "").strip()
if ALERT_WEBHOOK_URL and not ALERT_WEBHOOK_URL.startswith(("https://", "http://")):
    raise ImproperlyConfigured("ALERT_WEBHOOK_URL must be an http(s):// URL, "
                               f"not {ALERT_WEBHOOK_URL[:40]!r}")
ALERT_EMAILS = env_list("ALERT_EMAILS")
if any("@" not in address for address in ALERT_EMAILS):
    raise ImproperlyConfigured("ALERT_EMAILS must be comma-separated e-mail addresses")
# Each delivery's timeout: a dead receiver must not hold the alert job for long.
ALERT_TIMEOUT_SECONDS = env_number("ALERT_TIMEOUT_SECONDS", "5", minimum=0.1)
EMAIL_HOST = os.environ.get("EMAIL_HOST", "").strip() or "localhost"
EMAIL_PORT = int(env_number("EMAIL_PORT", "25", minimum=1, whole=True))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = ALERT_TIMEOUT_SECONDS
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "").strip() or "payout-console@localhost"

# GET /metrics (Prometheus) answers only with `Authorization: Bearer $METRICS_TOKEN`; unset:
# 404. Counters are shared by a server's processes through PROMETHEUS_MULTIPROC_DIR
# (payouts/metrics.py); gunicorn makes a private one when it is unset.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
if METRICS_TOKEN and len(METRICS_TOKEN) < 16:
    raise ImproperlyConfigured("METRICS_TOKEN must be at least 16 characters (a random value, "
                               "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
if _metrics_dir:  # prometheus-client writes there from the first count: it must exist
    try:
        Path(_metrics_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImproperlyConfigured(f"PROMETHEUS_MULTIPROC_DIR {_metrics_dir!r} cannot be "
                                   f"created: {exc}") from exc


def env_days(name: str, *, minimum: int, why: str) -> int | None:
    """A whole number of days, at least ``minimum``; None when unset."""
    value = (os.environ.get(name) or "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < minimum:
        raise ImproperlyConfigured(f"{name} must be a whole number of days, at least "
                                   f"{minimum} ({why}), not {value!r}")
    return int(value)


# Retention (payouts/services/retention.py: `manage.py prune` and a worker's daily job).
# Transaction logs are diagnostics: kept RETENTION_TXLOG_DAYS. Settled events are evidence:
# kept forever unless RETENTION_EVENT_DAYS is set, and then at least 31 days, since Stripe
# lists events for 30 and sync_events would store a pruned one again as missed.
RETENTION_TXLOG_DAYS = env_days("RETENTION_TXLOG_DAYS", minimum=1,
                                why="a day of logs at least") or 30
RETENTION_EVENT_DAYS = env_days("RETENTION_EVENT_DAYS", minimum=31,
                                why="Stripe lists events for 30 days, and sync_events would "
                                    "store a pruned one again")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "csp",
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
    "console.metrics.MetricsEndpoint",  # GET /metrics, with its token, past sessions
    "csp.middleware.CSPMiddleware",  # after the webhook's fast path: pages, not JSON
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
                "console.context_processors.attention",
            ],
        },
    },
]

# --- database ---------------------------------------------------------------
# DATABASE_URL points at any PostgreSQL, or is `embedded`: the checkout's own server
# (console/embedded_db.py), started on first use. Never started unless asked for
# (`make run` and the tests ask): a forgotten DATABASE_URL must not give production an
# empty database on local disk.
DATABASE_URL = os.environ.get("DATABASE_URL", "")
if not DATABASE_URL:
    raise ImproperlyConfigured(
        "DATABASE_URL is not set: set it to postgresql://user:password@host:5432/dbname, or "
        "to `embedded` for this checkout's own PostgreSQL (development and tests)")
if DATABASE_URL != "embedded":
    DATABASES = {
        "default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)
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
# Behind PgBouncer in transaction pooling (docs/deploy.md), consecutive transactions of
# one connection may run on different server sessions: no server-side cursors (they live
# in the session that declared them). The code keeps no other session state.
DATABASE_POOL_MODE = os.environ.get("DATABASE_POOL_MODE", "").strip() or "session"
if DATABASE_POOL_MODE not in {"session", "transaction"}:
    raise ImproperlyConfigured(
        "DATABASE_POOL_MODE must be 'session' (straight to PostgreSQL, or a pooler in session "
        f"mode) or 'transaction' (PgBouncer's transaction pooling), not {DATABASE_POOL_MODE!r}")
DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = DATABASE_POOL_MODE == "transaction"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

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

# --- HTTPS --------------------------------------------------------------------
# On by default without DEBUG: HTTP is redirected, HSTS is sent, cookies are Secure.
# DJANGO_HTTPS=false serves plain HTTP (the tests' servers on 127.0.0.1).
HTTPS = env_bool("DJANGO_HTTPS", not DEBUG)
SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_HSTS_SECONDS", "31536000")) if HTTPS else 0
# The console's own subdomains are ours to keep on HTTPS; the preload list is not: its
# directive is a hard-to-undo promise for the whole registrable domain, so it is never
# sent, and check --deploy's reminder about it (W021) is silenced.
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = False
SILENCED_SYSTEM_CHECKS = ["security.W021"]
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
# Behind a proxy that terminates TLS: the header it sets and its value for HTTPS, e.g.
# HTTP_X_FORWARDED_PROTO,https. Only if the proxy always sets (or strips) that header.
_proxy_header = env_list("DJANGO_SECURE_PROXY_SSL_HEADER")
if _proxy_header and (len(_proxy_header) != 2 or not _proxy_header[0].startswith("HTTP_")):
    raise ImproperlyConfigured(
        "DJANGO_SECURE_PROXY_SSL_HEADER must be a header and a value, e.g. "
        "HTTP_X_FORWARDED_PROTO,https")
SECURE_PROXY_SSL_HEADER = (_proxy_header[0], _proxy_header[1]) if _proxy_header else None

# Content-Security-Policy on every page: only our own files; no inline script or style
# (templates use static console.js/console.css and data- attributes instead).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
        "object-src": [NONE],
    },
}

LOGGING = log_config.configure(
    log_format=os.environ.get("LOG_FORMAT", "console"),
    level=os.environ.get("LOG_LEVEL", "INFO"),
)

# --- logins ---
# Failed logins are counted per username AND address (django-axes): the 10th failure in a
# row locks that username from that address for 15 minutes, even with the right password;
# the same username from elsewhere, and other usernames from the same address (an office
# behind one NAT), still log in. Locking by username alone would let anyone lock staff
# out; by address alone, lock out a whole office. A success resets the count. Lockouts are
# listed in the admin (Axes → Access attempts); deleting one lifts it.
INSTALLED_APPS += ["axes"]
MIDDLEWARE += [
    "console.middleware.IdleSessionExpiry",
    "console.middleware.HtmxLoginRedirect",
    "axes.middleware.AxesMiddleware",  # last, as django-axes requires
]
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses a locked-out login
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = int(os.environ.get("AXES_FAILURE_LIMIT", "10"))
AXES_COOLOFF_MINUTES = float(os.environ.get("AXES_COOLOFF_MINUTES", "15"))
if AXES_FAILURE_LIMIT < 1 or AXES_COOLOFF_MINUTES <= 0:
    raise ImproperlyConfigured("AXES_FAILURE_LIMIT must be at least 1 and "
                               "AXES_COOLOFF_MINUTES more than 0")
AXES_COOLOFF_TIME = AXES_COOLOFF_MINUTES / 60  # django-axes reads a float as hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# A try while locked out neither counts nor extends the lockout: it ends when it said.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_CALLABLE = "console.logins.lockout_response"  # 429, the login page's look
# The client's address: the TCP peer, or behind TRUSTED_PROXY_COUNT reverse proxies that
# append to X-Forwarded-For, the address the outermost one saw (console/logins.py).
TRUSTED_PROXY_COUNT = int(os.environ.get("TRUSTED_PROXY_COUNT", "0"))
AXES_CLIENT_IP_CALLABLE = "console.logins.client_ip"
AXES_VERBOSE = False  # its start-up banner is not a structlog event

# Django's four standard password rules (createsuperuser, changepassword, the admin's
# password forms).
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},  # 8
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# A session ends after SESSION_IDLE_HOURS without a request from its person
# (console.middleware.IdleSessionExpiry saves it again on each of their requests).
SESSION_COOKIE_AGE = int(float(os.environ.get("SESSION_IDLE_HOURS", "8")) * 3600)
SESSION_SAVE_EVERY_REQUEST = False  # IdleSessionExpiry does it, for people only
