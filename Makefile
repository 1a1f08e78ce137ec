# The two entry points of the README. Both create .venv on first use; torch==2.13.0 is
# installed first so pip takes the local CPU wheel where there is one (on a GPU machine it
# is PyPI's CUDA build); pyproject.toml only asks for a torch range.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint ci

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,loadtest]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/eagle3-appliance demo

# Two invocations: the load tests start Locust processes against an appliance subprocess,
# and are kept apart from the session that runs in-process servers.
test: $(STAMP)
	$(VENV)/bin/python -m pytest
	$(VENV)/bin/python -m pytest tests/loadtest

lint: $(STAMP)
	$(VENV)/bin/ruff check appliance client loadtest tests

ci:
	bash .ci/run
