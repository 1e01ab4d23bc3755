"""The coordinator reads the pollers' metric files even while a poller is creating one."""

from __future__ import annotations

import json
import struct

import pytest
from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

from pool.coordinator import PollerFilesCollector


def write_counter(path, value: float) -> None:
    key = json.dumps(("pool_signals_acked_total", "pool_signals_acked_total", {"worker": "0"},
                      "Rows marked processed"), sort_keys=True)
    values = MmapedDict(str(path))
    values.write_value(key, value, 0.0)
    values.close()


def acked(collector) -> float:
    samples = [s for m in collector.collect() for s in m.samples]
    return sum(s.value for s in samples if s.name == "pool_signals_acked_total")


def test_a_metric_file_still_being_created_is_passed_over_not_fatal(tmp_path):
    write_counter(tmp_path / "counter_poller-0.db", 7)
    (tmp_path / "counter_poller-1.db").touch()  # created, not yet sized: what a reader can meet
    # prometheus_client's own collector fails the whole read on it (struct.error).
    with pytest.raises(struct.error):
        multiprocess.MultiProcessCollector(None, path=str(tmp_path)).collect()
    collector = PollerFilesCollector(None, path=str(tmp_path))
    assert acked(collector) == 7
    write_counter(tmp_path / "counter_poller-1.db", 5)  # sized and written: counted from now on
    assert acked(collector) == 12
