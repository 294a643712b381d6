# xdpfw entry points. Everything runs from the repo's .venv, which scripts/setup.sh creates
# (with --system-site-packages, for Debian's bcc). `make run` sets up only what the service
# and its demo need (setup-run); every other target sets up the test stack too (setup).
# As root, or through sudo: no target calls sudo itself.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV        := .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS        ?=

.PHONY: all setup setup-run test lint run bench soak soak-service clean

all: test

setup:
	bash scripts/setup.sh test

setup-run:
	bash scripts/setup.sh run

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict xdpfw api
	$(VENV)/bin/mypy --strict bench

run: setup-run
	@[[ $$(id -u) -eq 0 ]] || { echo "make run: needs root (it loads an XDP program and, without" \
	    "--iface, builds a demo namespace): run it as root, or sudo make run" >&2; exit 1; }
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
