# The two entry points of the README. Both create .venv on first use; torch==2.13.0 is
# installed first so pip takes the local CPU wheel where there is one (on a GPU machine it
# is PyPI's CUDA build); pyproject.toml only asks for a torch range.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs ci automodel test-automodel

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,loadtest]'
	touch $@

# NeMo AutoModel 0.7.0 for the integration tests (tests/integration): the package itself
# without its GPU-training dependencies, plus the few its EAGLE-3 code imports (the
# `automodel` extra). Never touches torch or transformers.
AUTOMODEL_STAMP := $(VENV)/.automodel-installed
$(AUTOMODEL_STAMP): $(STAMP) requirements/automodel.txt
	$(PIP) install -q -e '.[test,loadtest,automodel]'
	$(PIP) install -q --no-deps -r requirements/automodel.txt
	touch $@

automodel: $(AUTOMODEL_STAMP)

# The integration tests, where a skip (AutoModel not importable) counts as a failure.
test-automodel: $(AUTOMODEL_STAMP)
	EAGLE3_REQUIRE_AUTOMODEL=1 $(VENV)/bin/python -m pytest tests/integration

demo: $(STAMP)
	$(VENV)/bin/eagle3-appliance demo

# Test files run in parallel worker processes (pytest-xdist), a file's tests on one worker so
# that its module-scoped servers start once; PYTEST_WORKERS=0 runs everything in one process.
# The Locust tests come last, in their own invocation: their load must not skew the
# timing-sensitive tests of the main run.
# One worker more than the CPUs (at most 4): much of a test's time is spent waiting for a server.
PYTEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, (os.cpu_count() or 1) + 1))")
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile
# Tests marked `serial` assert on relative speed and run afterwards, alone.
test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_PARALLEL) -m "not serial"
	$(VENV)/bin/python -m pytest -m serial
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist load tests/loadtest

# Static checks: ruff (lint + format) over everything, mypy over the three packages and monitoring/
# (configured in pyproject.toml), and the option tables the docs generate from the code.
lint: $(STAMP)
	$(VENV)/bin/ruff check appliance client loadtest benchmarks monitoring tests
	$(VENV)/bin/ruff format --check appliance client loadtest benchmarks monitoring tests
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml): --strict turns a broken link or a missing page into an error.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

ci:
	bash .ci/run
