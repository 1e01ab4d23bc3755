#!/usr/bin/env bash
# Start pool's supervisord programs with a fresh metrics directory:
#   PULSE_WORKERS=8 scripts/run-supervisord.sh [path/to/supervisord.conf]
# supervisord.conf points PROMETHEUS_MULTIPROC_DIR at metrics/ beside itself. Files left there by an
# earlier run would be added to this run's totals, and only the start of the whole set of programs
# may wipe them (a poller restarted alone counts on from its own files).
set -euo pipefail
conf=${1:-supervisord.conf}
[ -f "$conf" ] || { echo "run-supervisord: no such file: $conf" >&2; exit 2; }
[ -n "${PULSE_WORKERS:-}" ] || { echo "run-supervisord: set PULSE_WORKERS, the number of pollers" >&2; exit 2; }
here=$(cd "$(dirname "$conf")" && pwd)
mkdir -p "$here/metrics"
# Only pool's own files (named after poller slots, see pool/metrics_dir.py): the folder may hold others.
rm -f -- "$here"/metrics/*_poller-[0-9]*.db
exec supervisord -c "$conf" -n
