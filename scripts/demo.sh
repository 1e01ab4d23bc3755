#!/usr/bin/env bash
# The main job on the embedded default, no server needed: install pool, seed 10,000 signals
# into SQLite, relay them with 8 pollers onto a filesystem broker, let the reference Celery
# worker score them, and show the result. Everything it writes stays in ./demo-run/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e .
export PATH="$PWD/.venv/bin:$PATH"

rm -rf demo-run && mkdir demo-run && cd demo-run
pool seed --count 10000
pool worker --concurrency 2 > worker.log 2>&1 &
worker=$!
pool start --workers 8 > pool.log 2>&1 &
relay=$!
trap 'kill -TERM $relay $worker 2>/dev/null || true' EXIT

pool scores --wait-for 10000 --timeout 600
pool status
kill -TERM "$relay"
wait "$relay" && echo "pool start drained and exited 0 (log: demo-run/pool.log)"
kill -TERM "$worker"
wait "$worker" || true
