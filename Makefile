# The two commands a newcomer runs: `make test` and `make demo`.
# Each bootstraps what it needs: a virtualenv with the pinned Python dependencies
# (requirements.lock) and, for the tests that need it, the pinned reference PDS
# installed from npm into a cache outside the repository.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo bench lint typecheck check clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) examples/notes/demo.py

bench: $(STAMP)
	$(PY) benchmarks/local_writes.py
	$(PY) benchmarks/push.py
	$(PY) benchmarks/bookkeeping.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
