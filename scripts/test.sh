#!/usr/bin/env bash
# Install pool with its test tools and run the whole suite: unit tests, then integration and
# acceptance tests against the PostgreSQL, Redis and RabbitMQ on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
# The status page is checked in a headless Chromium; Debian's package, if root may install it.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
        || echo "test.sh: could not install chromium; the status page test says what it needs" >&2
fi
# The alert rules and dashboard queries are checked with promtool. Only that binary is taken from
# Debian's prometheus package, into the venv: installing the package would also start a Prometheus
# daemon on :9090 wherever an init system runs (its postinst does) and needs root.
if ! command -v promtool >/dev/null && [ ! -x .venv/bin/promtool ] && command -v apt-get >/dev/null; then
    scratch=$(mktemp -d)
    chmod 755 "$scratch"  # apt's download user writes there when run as root
    if (cd "$scratch" && apt-get download -q prometheus >/dev/null 2>&1 \
            && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool >promtool \
            && chmod 755 promtool && ./promtool --version >/dev/null 2>&1); then
        mv "$scratch/promtool" .venv/bin/promtool
    else
        echo "test.sh: could not fetch promtool; the promtool tests say what they need" >&2
    fi
    rm -rf "$scratch"
fi
.venv/bin/ruff check .
# Most tests wait on processes and services, so two run at once (POOL_TEST_WORKERS to change it);
# the few marked exclusive (they restart PostgreSQL) run alone afterwards. "No tests selected"
# (exit 5) from one of the two runs is fine when the arguments select only the other's tests.
status=0
.venv/bin/pytest -n "${POOL_TEST_WORKERS:-2}" --dist worksteal -m "not exclusive" "$@" || status=$?
exclusive=0
.venv/bin/pytest -m exclusive "$@" || exclusive=$?
if [ "$status" = 5 ] && [ "$exclusive" != 5 ]; then status=0; fi
if [ "$exclusive" != 0 ] && [ "$exclusive" != 5 ]; then status=$exclusive; fi
exit "$status"
