# A slim image that runs `pool start`; configure it with PULSE_* variables.
FROM python:3.11-slim

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
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('PULSE_METRICS_PORT', '9200'), timeout=4)"
CMD ["pool", "start"]
