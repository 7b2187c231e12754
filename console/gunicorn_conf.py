"""gunicorn settings for the console (``gunicorn -c python:console.gunicorn_conf console.wsgi``).

Measured on 2 cores (docs/benchmarks.md, the e2e sweep): sync workers, two per
core, serve the most webhook deliveries. A worker waits on PostgreSQL for a good
part of each request, so two per core keep the cores busy; threads in one process
would share its GIL. Sync workers do not keep connections alive: put a proxy
(nginx, a load balancer) in front, as production does anyway for TLS.
"""

import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * (os.cpu_count() or 1)))
worker_class = "sync"
timeout = 30  # a delivery takes milliseconds; a worker stuck this long is restarted
backlog = 256
