#!/usr/bin/env bash
# Install pool with its test tools and run the whole suite: unit tests, then integration and
# acceptance tests against the PostgreSQL, Redis and RabbitMQ on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check .
.venv/bin/pytest "$@"
