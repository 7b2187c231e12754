# Two commands do everything on a fresh machine with Python 3.11:
#   make run   - set up, then the console with demo data on http://127.0.0.1:8000
#   make test  - set up, then the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CHROMIUM := /usr/bin/chromium
PGBOUNCER := /usr/sbin/pgbouncer

.PHONY: setup run test lint bench soak soak-sync soak-pgbouncer clean-db chromium pgbouncer

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The demo's settings, written once into the git-ignored .env that the settings read (so
# commands typed by hand here behave the same): DEBUG on (so the development webhook
# secret applies, over plain HTTP), the checkout's embedded database, a random key.
.env:
	@umask 077; printf '%s\n' '# Written by `make run` for the demo in this checkout; real environment variables win.' \
	  'DJANGO_DEBUG=true' 'DATABASE_URL=embedded' \
	  "DJANGO_SECRET_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > $@
	@echo "wrote $@ (the demo's settings)"

# The demo: a worker for retries in the background, the console in the foreground;
# Ctrl-C stops both.
run: setup .env
	$(BIN)/python manage.py migrate --noinput
	LOG_LEVEL=WARNING $(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py process_webhooks & worker=$$!; \
	trap 'kill $$worker 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python manage.py runserver 127.0.0.1:8000

test: setup chromium
	$(BIN)/python -m pytest

# The browser tests drive Debian's chromium (Playwright cannot download browsers here).
chromium:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "The browser tests need Debian's chromium: sudo apt-get install chromium"; exit 1; \
	  fi; }

# The tests behind PgBouncer (TEST_PGBOUNCER=1, .ci/run) and soak-pgbouncer run Debian's
# pgbouncer, started by them on a free port; the package's own service is not used.
pgbouncer:
	@test -x $(PGBOUNCER) || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer; \
	  else \
	    echo "This needs Debian's pgbouncer: sudo apt-get install pgbouncer"; exit 1; \
	  fi; }

# Figures on this machine, printed and written to var/bench/ (docs/benchmarks.md).
bench: setup
	$(BIN)/python -m bench

# 10 000 events through crashes and a database restart; fails if one is lost or doubled.
soak: setup
	$(BIN)/python -m bench.soak

# Stripe as the source of truth: a fake Stripe holds every payout; 20 % of 3 000 events are
# never delivered and 2 % of payouts change silently. sync_events then reconcile_payouts
# --apply must bring every payout to Stripe's state, and a second run must change nothing.
soak-sync: setup
	$(BIN)/python -m bench.soak --drop 0.2

# The soak scaled out: two gunicorn nodes and three workers, all through PgBouncer in
# transaction pooling, with the database restarted half-way (docs/deploy.md).
soak-pgbouncer: setup pgbouncer
	$(BIN)/python -m bench.soak --pgbouncer

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Stop the embedded database and delete its data (it is created again on next use).
clean-db: setup
	-DATABASE_URL=embedded $(BIN)/python manage.py embedded_db stop
	rm -rf var/postgres
