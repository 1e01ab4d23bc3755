"""Poller slot files: one live process per slot and metrics folder, and the next one learns
whom it succeeds (flock is per open file, so one test process can play both)."""

from __future__ import annotations

import os

import pytest

from pool.metrics_dir import reset_metrics_dir
from pool.poller_slot import SlotTaken, claim_slot, current_member, slots_in_use


def test_a_slot_is_held_by_one_process_and_its_successor_learns_whom_it_replaces(tmp_path) -> None:
    folder = str(tmp_path)
    first = claim_slot(folder, "poller-0")
    assert first.predecessor is None
    first.record("web-1/poller-0/aa11")
    assert current_member(folder, "poller-0") == "web-1/poller-0/aa11"
    taken = rf"poller-0 already runs with metrics folder .* \(pid {os.getpid()}\)"
    with pytest.raises(SlotTaken, match=taken):
        claim_slot(folder, "poller-0")
    assert slots_in_use(folder) == [f"poller-0 (pid {os.getpid()})"]
    other = claim_slot(folder, "poller-1")  # another slot is free
    other.close()
    first.close()  # the process ended, however it ended
    assert slots_in_use(folder) == []
    second = claim_slot(folder, "poller-0")
    assert second.predecessor == "web-1/poller-0/aa11"
    second.record("web-1/poller-0/bb22")
    assert current_member(folder, "poller-0") == "web-1/poller-0/bb22"
    second.close()


def test_emptying_the_metrics_folder_keeps_the_slot_files(tmp_path) -> None:
    claim = claim_slot(str(tmp_path), "poller-0")
    claim.record("h/poller-0/cc33")
    claim.close()
    (tmp_path / "counter_poller-0.db").write_bytes(b"old totals")
    reset_metrics_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["poller-0.member"]
    assert current_member(str(tmp_path), "poller-0") == "h/poller-0/cc33"


def test_pool_start_holds_its_metrics_folder_and_refuses_one_that_pollers_write_to(tmp_path) -> None:
    from pool.errors import ConfigError
    from pool.supervisor import hold_metrics_dir

    folder = str(tmp_path / "metrics")  # created if missing
    hold = hold_metrics_dir(folder)
    taken = rf"pool-start already runs with metrics folder .* \(pid {os.getpid()}\)"
    with pytest.raises(ConfigError, match=taken):
        hold_metrics_dir(folder)
    hold.close()
    poller = claim_slot(folder, "poller-3")  # a `pool poller --slot 3` on this folder
    poller.record("h/poller-3/dd44")
    with pytest.raises(ConfigError, match=rf"in use by running pollers \(poller-3 \(pid {os.getpid()}\)\)"):
        hold_metrics_dir(folder)
    poller.close()
    hold_metrics_dir(folder).close()  # free again: nobody writes there
