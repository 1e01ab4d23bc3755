"""The multi-process metrics folder (PROMETHEUS_MULTIPROC_DIR): pool's own files in it, and no
other metric files that the coordinator would sum into pool's totals.

The folder may be shared (a volume, /tmp): only the files pool writes are ever deleted. They are
named by prometheus_client as `<kind>_<process>.db`, and pool names the process after the
poller's slot (pool.metrics.use_worker_files): `counter_poller-0.db`, `gauge_livemax_poller-3.db`.
"""

from __future__ import annotations

import os
import re

from pool.errors import ConfigError

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
OWN_FILE = re.compile(r"^(?:counter|gauge_[a-z]+|histogram|summary)_poller-\d+\.db$")


def _entries(path: str) -> list[os.DirEntry]:
    try:
        os.makedirs(path, exist_ok=True)
        with os.scandir(path) as entries:
            return list(entries)
    except OSError as exc:
        raise ConfigError(f"{METRICS_DIR_VARIABLE}: cannot use {path}: {exc.strerror}") from None


def _is_own(entry: os.DirEntry) -> bool:
    return bool(OWN_FILE.match(entry.name)) and entry.is_file(follow_symlinks=False)


def check_metrics_dir(path: str) -> list[os.DirEntry]:
    """pool's own files in `path` (created if missing); a one-line ConfigError if it also holds
    other metric files (*.db), which every scrape would add to pool's."""
    entries = _entries(path)
    foreign = sorted(e.name for e in entries if e.name.endswith(".db") and not _is_own(e))
    if foreign:
        raise ConfigError(
            f"{METRICS_DIR_VARIABLE} {path} holds metric files that are not pool's ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); they would be summed into pool's metrics: give pool"
            " a folder of its own"
        )
    return [e for e in entries if _is_own(e)]


def reset_metrics_dir(path: str) -> None:
    """Delete pool's files of an earlier run (they would be summed in), and nothing else."""
    for entry in check_metrics_dir(path):
        try:
            os.remove(entry.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"{METRICS_DIR_VARIABLE}: cannot delete {entry.path}: {exc.strerror}") from None
