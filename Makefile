# xdpfw developer entry points. Everything runs from the repo's .venv, which
# scripts/setup.sh creates (with --system-site-packages, for Debian's bcc).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV        := .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS        ?=

.PHONY: all setup test lint run bench soak soak-service clean

all: test

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict xdpfw api

run: setup
	$(VENV)/bin/xdpfw serve $(ARGS)

soak: setup
	$(PY) -m xdpfw.verify.soak --frames 10000000 $(ARGS)

soak-service: setup
	$(PY) scripts/soak_service.py --minutes 30 $(ARGS)

bench: setup
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
