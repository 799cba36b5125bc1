# The two commands a newcomer runs: `make test` and `make demo`.
# Each bootstraps what it needs: a virtualenv with the pinned Python dependencies
# (requirements.lock) and, for the tests that need it, the pinned reference PDS
# installed from npm into a cache outside the repository.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo bench lint typecheck docs check clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# DEMO_ARGS: e.g. --data DIR to keep the databases and the PDS's data (see the script).
demo: $(STAMP)
	$(PY) examples/notes/demo.py $(DEMO_ARGS)

# Every benchmark, each against its hand-written baseline; one that misses a target exits 1,
# which make reports ("ignored") and goes on to the next.
bench: $(STAMP)
	-$(PY) benchmarks/local_writes.py
	-$(PY) benchmarks/push.py
	-$(PY) benchmarks/bookkeeping.py
	-$(PY) benchmarks/validate_record.py
	-$(PY) benchmarks/blobs.py
	-$(PY) benchmarks/pull.py
	-$(PY) benchmarks/follow.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The API reference, generated from the docstrings by pdoc into build/docs/ (open
# build/docs/index.html): the public packages and their `__all__`s, no private `_modules`.
# pdoc reports problems as warnings and still exits 0, so its stderr is kept apart: anything
# on it fails the build (with `-W always`, no warning is hidden by a filter).
DOC_MODULES := atsync atsync.db atsync.app atsync.atproto atsync.lexicon atsync.sync

docs: $(STAMP)
	rm -rf build/docs
	@mkdir -p build
	$(PY) -W always -m pdoc --docformat restructuredtext -o build/docs $(DOC_MODULES) \
		2> build/docs-warnings.txt || { cat build/docs-warnings.txt >&2; exit 1; }
	@if [ -s build/docs-warnings.txt ]; then cat build/docs-warnings.txt >&2; \
		echo "make docs: pdoc warned (above); the reference must build without warnings" >&2; exit 1; fi
	@rm -f build/docs-warnings.txt

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build
