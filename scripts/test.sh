#!/usr/bin/env bash
# `make test`: the end-to-end tests (-m e2e: real Airflow stacks, which mostly wait on their servers) and
# every other test in two pytest processes side by side, as the version matrix runs two majors at once;
# the end-to-end output comes last, whole. Passes when both pass (a selection holding no test of one kind,
# pytest's exit 5, counts as passed for that kind).
#
# usage: scripts/test.sh PYTHON [PYTEST_ARGS...]
set -uo pipefail
py=$1
shift
e2e_log=$(mktemp)
"$py" -m pytest -q --durations=15 -rs -m e2e "$@" >"$e2e_log" 2>&1 &
e2e=$!
"$py" -m pytest -q --durations=15 -rs -m "not e2e" "$@"
rest=$?
wait "$e2e"
e2e_status=$?
echo "== the end-to-end tests (-m e2e), run beside the others"
cat "$e2e_log"
rm -f "$e2e_log"
passed() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }
if passed "$rest" && passed "$e2e_status"; then
    exit 0
fi
echo "make test: FAILED (the others: exit $rest; the end-to-end tests: exit $e2e_status)" >&2
exit 1
