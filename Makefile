# The two commands of the README: `make demo` (a real backup + restore check) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench prereqs venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

prereqs:
	bash scripts/prereqs.sh

demo: prereqs venv
	$(PY) -m demo.run $(ARGS)

test: prereqs venv
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# Without the end-to-end tests that start a real Airflow.
test-fast: prereqs venv
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)

bench: prereqs venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .demo
