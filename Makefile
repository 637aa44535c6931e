# Two commands do all the set-up on a fresh Debian machine (root, Python >= 3.11):
#   make run   - the whole system (ingest, consumer groups, ticker) on an embedded Redis
#   make test  - the test suite (a redis-server process on 127.0.0.1, no Docker needed)
# Each installs what is missing first: uv, the locked virtual environment, redis-server,
# and for the browser test Chromium (valgrind for a benchmark script's test).

SHELL := /bin/bash
PY ?= python3
VENV := .venv
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
APT_PACKAGES_RUN := redis-server redis-tools ffmpeg espeak-ng
APT_PACKAGES_TEST := $(APT_PACKAGES_RUN) chromium valgrind
# The suite mostly waits (subprocesses, timeouts, Redis), so it runs on pytest-xdist workers;
# tests marked `serial` (1,000 sockets at once, kill -9 chaos) run after them, alone, so the
# others' load cannot starve them. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3
PYTEST_ARGS ?=

.PHONY: run test lint bench setup-run setup-test venv clean

# Without STREAMPROC_AWS_ENDPOINT_URL (unset; an empty value means real AWS), discovery works on
# a moto server that `streamproc aws-demo` starts on 127.0.0.1:4566 and seeds (docs/aws.md).
AWS_DEMO_ENDPOINT := http://127.0.0.1:4566

run: setup-run
	@if [ -z "$${STREAMPROC_AWS_ENDPOINT_URL+set}" ]; then \
	  export STREAMPROC_AWS_ENDPOINT_URL=$(AWS_DEMO_ENDPOINT) AWS_EC2_METADATA_DISABLED=true \
	    AWS_ACCESS_KEY_ID="$${AWS_ACCESS_KEY_ID:-demo}" \
	    AWS_SECRET_ACCESS_KEY="$${AWS_SECRET_ACCESS_KEY:-demo}" \
	    STREAMPROC_WORKERS_INTERVAL_S="$${STREAMPROC_WORKERS_INTERVAL_S:-15}"; \
	  echo "AWS: the demo moto server on $(AWS_DEMO_ENDPOINT) (set STREAMPROC_AWS_ENDPOINT_URL= for AWS)"; \
	fi; \
	exec $(VENV)/bin/streamproc up

test: setup-test
	$(VENV)/bin/pytest -n $(TEST_WORKERS) -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(VENV)/bin/pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/streamproc schema check

bench: setup-run
	$(VENV)/bin/python benchmarks/throughput.py

setup-run: venv
	@scripts/ensure-system-packages $(APT_PACKAGES_RUN)

setup-test: venv
	@scripts/ensure-system-packages $(APT_PACKAGES_TEST)

venv: $(VENV)/.synced

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || [ -x "$(UV)" ] || $(PY) -m pip install --quiet uv
	$$(command -v uv || echo $(UV)) sync --frozen --all-extras
	@touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
