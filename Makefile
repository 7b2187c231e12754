# Two commands do everything on a fresh machine with Python 3.11:
#   make run   - set up, then the console with demo data on http://127.0.0.1:8000
#   make test  - set up, then the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# A fixed, clearly-named development secret so the demo and `stripe_trigger`
# agree; production sets its own STRIPE_WEBHOOK_SECRET.
DEV_WEBHOOK_SECRET := whsec_dev_only_payout_console_not_a_real_secret

.PHONY: setup run test lint clean-db

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: export DJANGO_DEBUG ?= true
run: export STRIPE_WEBHOOK_SECRET ?= $(DEV_WEBHOOK_SECRET)
run: setup
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py runserver 127.0.0.1:8000

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Stop the embedded database and delete its data (it is created again on next use).
clean-db: setup
	-$(BIN)/python manage.py embedded_db stop
	rm -rf var/postgres
