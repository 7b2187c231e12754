"""gunicorn settings for the console (``gunicorn -c python:console.gunicorn_conf console.wsgi``).

Measured on 2 cores (docs/benchmarks.md, the e2e sweep): two worker processes per
core with two threads each. A worker waits on PostgreSQL for a good part of each
request, so two per core keep the cores busy; more threads per process only queue
on its GIL. gthread keeps connections alive; sync workers, which close each one,
were 5-7 % faster in the sweep, so behind a proxy that pools connections they are
the alternative.
"""

import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * (os.cpu_count() or 1)))
worker_class = "gthread"
threads = 2
keepalive = 30  # seconds an idle connection stays open for its next delivery
timeout = 30  # a delivery takes milliseconds; a worker stuck this long is restarted
backlog = 256
# gunicorn would take X-Forwarded-Proto from a local peer as HTTPS on its own; only Django
# decides, from DJANGO_SECURE_PROXY_SSL_HEADER.
forwarded_allow_ips = ""
