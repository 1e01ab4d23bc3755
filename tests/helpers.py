"""Test helpers: the pool CLI as a subprocess, and reading Celery messages off a broker."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

POOL = [sys.executable, "-m", "pool"]


def clean_env(**pulse: str) -> dict[str, str]:
    """The test process's environment without PULSE_* settings, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "PROMETHEUS_"))}
    env.update(pulse)
    return env


def run_pool(*args: str, env: Mapping[str, str], cwd: Path | str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*POOL, *args], env=dict(env), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def row_counts(env: Mapping[str, str], cwd: Path | str | None = None) -> dict[str, int]:
    """processed / unprocessed / dead, as `pool status --json` reads them from the database.

    Its exit code says whether the pool is healthy (1 also when no coordinator answers, as with
    `--metrics-port 0`); the row counts are there either way."""
    result = run_pool("status", "--json", env=env, cwd=cwd)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    return {key: report[key] for key in ("processed", "unprocessed", "dead")}


class PoolProcess:
    """A long-running pool command (or another `program`) whose combined output is read line by line."""

    def __init__(self, *args: str, env: Mapping[str, str], cwd: Path | str | None = None,
                 program: Sequence[str] = POOL) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [*program, *args], env=dict(env), cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match:
        regex = re.compile(pattern)
        for line in list(self.lines):
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self._new.empty():
                    break
                continue
            if match := regex.search(line):
                return match
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines[-50:]))

    def wait_for_lines(self, pattern: str, count: int, timeout: float = 60) -> list[re.Match]:
        """The first `count` lines matching `pattern`, once that many have been written."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [match for line in list(self.lines) if (match := regex.search(line))]
            if len(found) >= count:
                return found[:count]
            if time.monotonic() > deadline or (self.proc.poll() is not None and self._new.empty()):
                raise AssertionError(f"{len(found)} of {count} lines matching {pattern!r}; output:\n"
                                     + "\n".join(self.lines[-50:]))
            with contextlib.suppress(queue.Empty):  # a new line, or a look at whether it ended
                self._new.get(timeout=0.2)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def wait_until(predicate, timeout: float = 60, interval: float = 0.2, message: str = "condition"):
    """Poll a real observable (row counts, files) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def decode_celery_message(raw: bytes | str) -> dict:
    """A Celery protocol-2 message as kombu stores it on Redis or in a filesystem queue."""
    envelope = json.loads(raw)
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, kwargs, _embed = json.loads(body)
    return {"id": envelope["headers"]["id"], "task": envelope["headers"]["task"],
            "args": args, "kwargs": kwargs}


# Fields that differ between any two publishes: per-process or per-message random values.
VOLATILE = {("properties", "delivery_tag"), ("properties", "reply_to"), ("headers", "origin")}


def comparable(raw: bytes | str) -> dict:
    """A raw message as kombu stores it on Redis, for a field by field comparison with what
    `send_task` writes. The fields that differ per publish, per process or per Celery app say
    only whether they are set: each message must have one, whatever it is."""
    message = json.loads(raw)
    for section, key in VOLATILE:
        message[section][key] = bool(message[section].get(key))
    return message


def redis_lpush_both_ways(settings, batch) -> tuple[list[int], list[dict], list[int], list[dict]]:
    """Publish `batch` to Redis once with send_task (the reference Publisher) and once with the
    publisher the settings get; returns each one's accepted ids and comparable messages."""
    import redis

    from pool.publisher import Publisher, create_publisher

    reference, batched = Publisher(settings), create_publisher(settings)
    client = redis.Redis.from_url(settings.broker_url)
    try:
        accepted_by_send_task = reference.publish(batch).accepted
        by_send_task = [comparable(m) for m in client.lrange(settings.queue, 0, -1)]
        client.delete(settings.queue)
        accepted_by_batch = batched.publish(batch).accepted
        by_batch = [comparable(m) for m in client.lrange(settings.queue, 0, -1)]
    finally:
        reference.close()
        batched.close()
        client.close()
    return accepted_by_send_task, by_send_task, accepted_by_batch, by_batch


def redis_messages(redis_url: str, queue_name: str) -> list[dict]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return [decode_celery_message(m) for m in client.lrange(queue_name, 0, -1)]
    finally:
        client.close()


def amqp_task_ids(amqp_url: str, queue_name: str) -> list[str]:
    """The task id of every message on a RabbitMQ queue, taking them off it."""
    from kombu import Connection

    with Connection(amqp_url) as conn:
        channel = conn.channel()
        ids = []
        while (message := channel.basic_get(queue_name, no_ack=True)) is not None:
            ids.append(message.headers["id"])
        return ids


def filesystem_messages(folder: Path, queue_name: str = "celery") -> list[dict]:
    return [decode_celery_message(p.read_bytes()) for p in Path(folder).glob(f"*.{queue_name}.msg")]


# A logfmt pair: a bare value, or a quoted one whose escapes are JSON's.
KV_PAIR = re.compile(r'([A-Za-z0-9_.-]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?: |$)')


def parse_kv(line: str) -> dict[str, str]:
    """A logfmt line -> {key: value as text}; asserts the whole line is made of pairs."""
    pairs, position = {}, 0
    for match in KV_PAIR.finditer(line):
        assert match.start() == position, f"unparsable logfmt at {position}: {line!r}"
        key, raw = match[1], match[2]
        pairs[key] = json.loads(raw) if raw.startswith('"') else raw
        position = match.end()
    assert position == len(line), f"unparsable logfmt tail: {line[position:]!r}"
    return pairs


def make_settings(**overrides):
    """Settings from defaults and these overrides only, whatever the test's environment holds."""
    from pool.config import load_settings

    return load_settings(environ={}, overrides=overrides)


def set_time(store, table: str, column: str, seconds: float, where: str, **params) -> None:
    """Set a time column `seconds` from now on the database's clock (negative: in the past):
    time moved by writing it rather than waited out, so a loaded machine cannot blur a bound."""
    from sqlalchemy import text

    shift = store._plus_seconds("s") if seconds >= 0 else store._minus_seconds("s")
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE {table} SET {column} = {shift} WHERE {where}"),
                     {"s": abs(seconds), **params})


class SteppedClock:
    """A monotonic clock that moves only when a test moves it."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def move_clock(heartbeat, clock: SteppedClock, to: float) -> None:
    """Move a LeaseHeartbeat's clock to `to` and have its beat thread look at it."""
    clock.now = to
    # The beat thread sleeps on real time until its next beat is due; have it read the clock now.
    with heartbeat._changed:
        heartbeat._changed.notify()
