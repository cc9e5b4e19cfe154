#!/usr/bin/env bash
# The version matrix: MATRIX_TESTS against each major of MATRIX, MATRIX_JOBS majors at a time (their
# clusters use their own temporary directories and free ports). Each major's output goes to a log that is
# printed whole when it ends; the script fails if any major failed, naming it.
# Usage: scripts/matrix.sh PYTHON "MAJORS" "TESTS" [JOBS]
set -uo pipefail
py=$1; majors=$2; tests=$3; jobs=${4:-2}
logs=$(mktemp -d)
declare -A pids=()
failed=()
finish() {  # $1: major
    local v=$1
    if wait "${pids[$v]}"; then status=ok; else status=FAILED; failed+=("$v"); fi
    echo "== PostgreSQL $v: $status"
    cat "$logs/$v.log"
    unset "pids[$v]"
}
for v in $majors; do
    while [ "${#pids[@]}" -ge "$jobs" ]; do
        sleep 2
        for m in "${!pids[@]}"; do kill -0 "${pids[$m]}" 2>/dev/null || finish "$m"; done
    done
    PG_MAJOR=$v $py -m pytest -q -rs --durations=5 -p no:cacheprovider -m "not e2e" $tests >"$logs/$v.log" 2>&1 &
    pids[$v]=$!
done
for m in "${!pids[@]}"; do finish "$m"; done
# The tests of every major together, as one closing line: "matrix: N passed, M failed".
count() { cat "$logs"/*.log | grep -E '^=*[ ]*[0-9]+ (passed|failed)' | grep -oE "[0-9]+ $1" | awk '{n += $1} END {print n + 0}'; }
passed=$(count passed); failed_tests=$(count failed)
rm -rf "$logs"
if [ "${#failed[@]}" -gt 0 ]; then echo "matrix FAILED on PostgreSQL ${failed[*]}"; fi
echo "matrix: $passed passed, $failed_tests failed"
[ "${#failed[@]}" -eq 0 ]
