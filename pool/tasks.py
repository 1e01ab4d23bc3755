"""The reference Celery worker: `ingest_and_score_signal` scores a signal into `signal_scores`.

`pool worker` builds the app with `create_worker_app`; importing this module starts nothing.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from celery import Celery

from pool.broker import create_celery_app
from pool.config import Settings, load_settings
from pool.store import create_db_engine
from pool.store.scores import ScoresStore

SOURCE_WEIGHTS = {"sensor": 1.0, "api": 0.8, "manual": 0.5}

# Set by create_worker_app in the worker's parent process (a plain string, safe across fork);
# the engine itself is created lazily in each worker child.
_db_url: str | None = None
_scores: ScoresStore | None = None
_scores_lock = threading.Lock()


def score_signal(signal: dict[str, Any]) -> float:
    """A bounded score in [0, 100]: magnitude of the value, weighted by how trusted its source is."""
    value = signal.get("value")
    magnitude = 0.0 if value is None else math.tanh(abs(float(value)) / 100.0)
    weight = SOURCE_WEIGHTS.get(str(signal.get("source") or "").lower(), 0.3)
    return round(100.0 * magnitude * weight, 4)


def _scores_store() -> ScoresStore:
    global _scores
    with _scores_lock:
        if _scores is None:
            _scores = ScoresStore(create_db_engine(_db_url or load_settings().db_url))
        return _scores


def ingest_and_score_signal(signal: dict[str, Any]) -> float:
    score = score_signal(signal)
    _scores_store().record(int(signal["id"]), signal.get("name"), score)
    return score


def create_worker_app(settings: Settings) -> Celery:
    global _db_url
    _db_url = settings.db_url
    app = create_celery_app(settings, name="pool-worker")
    app.conf.update(
        task_acks_late=True,  # a worker killed mid-task leaves the message for another worker
        worker_prefetch_multiplier=16,
    )
    app.task(name=settings.task_name, ignore_result=True)(ingest_and_score_signal)
    return app
