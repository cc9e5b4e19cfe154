#!/usr/bin/env bash
# Install what the demo and the tests need from Debian when it is missing:
# PostgreSQL server binaries (initdb/pg_ctl/postgres + contrib for amcheck), rsync, pgbouncer,
# redis-server, zstd, pgbackrest, btrfs-progs, python3-venv (for `make venv`) and docker-compose.
set -euo pipefail
need=()
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null 2>&1; then
  need+=(postgresql postgresql-contrib)
fi
command -v rsync >/dev/null 2>&1 || need+=(rsync)
# `make venv` runs "$PYTHON -m venv", which needs ensurepip: Debian ships it in python3-venv.
"${PYTHON:-python3}" -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)  # validates docker-compose.yml in the tests
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
command -v npm >/dev/null 2>&1 || need+=(npm)  # other PostgreSQL majors for `make test-matrix`
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)  # tests/test_poolers.py
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)  # the Celery broker of demo/stack.py
command -v zstd >/dev/null 2>&1 || need+=(zstd)  # `make bench`: tar | zstd, the tar format's reference
command -v pgbackrest >/dev/null 2>&1 || need+=(pgbackrest)  # `make bench`: archive-push, wal-push's reference
command -v strace >/dev/null 2>&1 || need+=(strace)  # tests/test_durability.py: what is fsynced, in which order
command -v mkfs.btrfs >/dev/null 2>&1 || need+=(btrfs-progs)  # tests/test_snapshots.py: snapshot backups on a loop device
if [ ${#need[@]} -gt 0 ]; then
  echo "installing with apt: ${need[*]}"
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
