# A slim image that runs `pool start` (PULSE_WORKERS pollers and the coordinator) as a non-root
# user; configure it with PULSE_* variables, PULSE_DB_URL and PULSE_BROKER_URL at least. The same
# image runs `pool init-db` and `pool worker`: deploy/docker-compose.yml runs all three.
# Give it time to drain on stop (PULSE_SHUTDOWN_TIMEOUT, 30 s): `docker run --stop-timeout 45`,
# or `stop_grace_period: 45s` in compose; Docker's default of 10 s cuts a drain short.
FROM python:3.11-slim

# No credentials here: they belong in the environment the container is started with.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PULSE_METRICS_HOST=0.0.0.0 PULSE_METRICS_PORT=9200 PULSE_WORKERS=8

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pool ./pool
RUN pip install --disable-pip-version-check . \
    && useradd --create-home --uid 10001 pool \
    && mkdir -p /data && chown pool /data

USER pool
WORKDIR /data
EXPOSE 9200
STOPSIGNAL SIGTERM
# /readyz answers 200 only while the database and the broker answer and a poller is live, so the
# container turns unhealthy when pool cannot relay, not merely when its port is open. It asks the
# loopback address of PULSE_METRICS_HOST's family (127.0.0.1 for the 0.0.0.0 above, [::1] for ::),
# as `pool status` does; an IP address, so no Host name to allow.
# Bound to 0.0.0.0, `pool reload` works only with PULSE_HTTP_TOKEN set; SIGHUP works regardless. A container running `pool init-db` or
# `pool worker` serves no /readyz: turn the check off there (compose: healthcheck: disable: true).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; from pool.config import load_settings; from pool.http_address import client_url; s = load_settings(); urllib.request.urlopen(client_url(s.metrics_host, s.metrics_port) + '/readyz', timeout=4)"
CMD ["pool", "start"]
