#!/usr/bin/env bash
# Install what the tests need, then lint and run the test suite (extra arguments go to pytest).
# The Slurm and Grid Engine clusters the tests use are started on demand and stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
stop_clusters() {
  bash scripts/slurm_cluster.sh stop >/dev/null 2>&1 || true
  bash scripts/sge_cluster.sh stop >/dev/null 2>&1 || true
}
trap stop_clusters EXIT
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
