"""Which process runs poller slot K beside one metrics folder, and which ran it before.

A poller writes its metrics into files named by its slot (pool/metrics.py), so two live
processes in one slot of one folder would overwrite each other's counters and heartbeat. Each
poller therefore holds an exclusive lock on `<folder>/poller-K.member` for its whole life and
writes its member name there. The file tells

- a second process for the same slot and folder that the slot is taken (it refuses to start);
- the next process in the slot (a restart) whom it succeeds, so it can take over its
  predecessor's membership and shards at once instead of waiting for their leases to expire;
- the coordinator, which member each of its pollers is in the members table;
- `pool start`, before it empties the folder, that pollers still write there.

The lock is the kernel's (flock): it goes with the process, however that ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass

SUFFIX = ".member"


class SlotTaken(Exception):
    """Another live process holds this slot in this metrics folder."""


def slot_file(folder: str, slot: str) -> str:
    return os.path.join(folder, slot + SUFFIX)


def is_slot_file(name: str) -> bool:
    return name.endswith(SUFFIX)


@dataclass
class SlotClaim:
    """This process's hold on its slot; `predecessor` is the member that held it last, if any."""

    path: str
    fd: int
    predecessor: str | None

    def record(self, member: str) -> None:
        """Name this process's member in the slot file, for its successor and the coordinator."""
        data = f"{member}\n{os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def claim_slot(folder: str, slot: str) -> SlotClaim:
    """Lock `slot` in `folder` for this process's life, or raise SlotTaken naming the holder."""
    path = slot_file(folder, slot)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # OSError: the folder is not usable at all
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _member, pid = _parse(_read(fd))
        os.close(fd)
        holder = f" (pid {pid})" if pid else ""
        raise SlotTaken(f"{slot} already runs with metrics folder {folder}{holder}") from None
    except OSError:
        # A filesystem without locks: run, but with no proof that the last holder is gone, take
        # nothing over (its shards come free when its leases expire).
        return SlotClaim(path, fd, None)
    member, _pid = _parse(_read(fd))
    return SlotClaim(path, fd, member)


def current_member(folder: str, slot: str) -> str | None:
    """The member that runs, or last ran, `slot` with this folder."""
    try:
        with open(slot_file(folder, slot), "rb") as f:
            return _parse(f.read())[0]
    except OSError:
        return None


def slots_in_use(folder: str) -> list[str]:
    """Slots whose process is alive (holds its lock) in `folder`: "poller-0 (pid 12)"."""
    busy = []
    try:
        names = sorted(n for n in os.listdir(folder) if is_slot_file(n))
    except OSError:
        return []
    for name in names:
        try:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            _member, pid = _parse(_read(fd))
            busy.append(name[: -len(SUFFIX)] + (f" (pid {pid})" if pid else ""))
        except OSError:
            pass  # no locks on this filesystem: nothing to tell
        finally:
            os.close(fd)
    return busy


def _read(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def _parse(data: bytes) -> tuple[str | None, str | None]:
    lines = data.decode("utf-8", "replace").splitlines()
    member = lines[0].strip() if lines and lines[0].strip() else None
    pid = lines[1].strip() if len(lines) > 1 and lines[1].strip().isdigit() else None
    return member, pid
