"""The settings of a test run: the production settings (console/settings.py), with what
tests need set here and nothing read from the demo checkout's `.env`.

Set in this process's environment, so the processes tests start inherit the same; the
helpers that build a server's or worker's environment set these explicitly too
(tests/payouts/helpers.py ``server_env``).
"""

import os

from tests import TEST_SECRET_KEY, pgbouncer

os.environ["DJANGO_ENV_FILE"] = ""  # never the demo's DJANGO_DEBUG=true
os.environ.setdefault("DJANGO_SECRET_KEY", TEST_SECRET_KEY)
os.environ.setdefault("DATABASE_URL", "embedded")  # or an external server (.ci/run)
# Django's test client speaks plain HTTP; tests/security checks HTTPS on a real server.
os.environ["DJANGO_HTTPS"] = "false"

# TEST_PGBOUNCER=1 (.ci/run): the test connections go through PgBouncer in transaction
# pooling (tests/conftest.py), with the settings production uses there (docs/deploy.md).
if pgbouncer.wanted():
    os.environ["DATABASE_POOL_MODE"] = "transaction"

from console.settings import *  # noqa: F403

# A refusal counted in this process (the test client) is written at once, in the test's
# transaction, not by a background thread later (payouts/services/inbox.py).
WEBHOOK_REJECTION_FLUSH_SECONDS = 0.0
