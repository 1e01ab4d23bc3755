"""The `pool` command: parse and validate, then call into the package."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from pool.config import ENVIRONMENT, load_settings
from pool.errors import PoolError

# Flags shared by every command; each maps to a Settings field and overrides its PULSE_* variable.
SETTING_FLAGS: list[tuple[str, str, type | click.ParamType]] = [
    ("--db-url", "db_url", str),
    ("--broker-url", "broker_url", str),
    ("--broker-folder", "broker_folder", str),
    ("--table", "table", str),
    ("--queue", "queue", str),
    ("--task-name", "task_name", str),
    ("--log-level", "log_level", str),
]
START_FLAGS: list[tuple[str, str, type | click.ParamType]] = [
    ("--workers", "workers", str),
    ("--batch-size", "batch_size", str),
    ("--poll-interval", "poll_interval", str),
    ("--lease-seconds", "lease_seconds", str),
    ("--metrics-port", "metrics_port", str),
    ("--metrics-host", "metrics_host", str),
]


def with_settings(flags: list[tuple[str, str, Any]]) -> Callable:
    """Add setting flags to a command and hand it a validated Settings as `settings`."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            overrides = {key: kwargs.pop(key, None) for _flag, key, _type in SETTING_FLAGS + flags}
            return command(settings=load_settings(overrides=overrides), **kwargs)

        for flag, key, type_ in reversed(SETTING_FLAGS + flags):
            wrapper = click.option(flag, key, type=type_, default=None,
                                   help=f"Overrides {ENVIRONMENT[key]}.")(wrapper)
        return wrapper

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pool")
def cli() -> None:
    """Relay rows of a SQL signals table into Celery tasks."""


@cli.command("init-db")
@with_settings([])
def init_db(settings: Any) -> None:
    """Create the signals table, or add the relay's columns and index to an existing one."""
    from pool.store import open_store

    store = open_store(settings)
    try:
        changes = _guard_db(settings, store.init_schema)
    finally:
        store.close()
    if not changes.changed:
        click.echo(f"table {settings.table}: already prepared, nothing changed")
        return
    if changes.created_table:
        click.echo(f"table {settings.table}: created")
    if changes.added_columns:
        click.echo(f"table {settings.table}: added column(s) {', '.join(changes.added_columns)}")
    for index in changes.created_indexes:
        click.echo(f"table {settings.table}: created index {index}")


@cli.command()
@click.option("--count", type=click.IntRange(1, 100_000_000), default=10_000, show_default=True)
@click.option("--chunk", type=click.IntRange(1, 1_000_000), default=5_000, show_default=True,
              help="Rows per insert transaction.")
@with_settings([])
def seed(settings: Any, count: int, chunk: int) -> None:
    """Insert COUNT synthetic signals (prepares the table first if needed)."""
    from pool.seeding import generate_signals
    from pool.store import open_store

    store = open_store(settings)
    try:
        _guard_db(settings, store.init_schema)
        rows = generate_signals(count)
        with click.progressbar(length=count, label="seeding signals", file=sys.stderr) as bar:
            remaining = count
            while remaining:
                batch = [next(rows) for _ in range(min(chunk, remaining))]
                store.insert_signals(batch)
                remaining -= len(batch)
                bar.update(len(batch))
    finally:
        store.close()
    click.echo(f"inserted {count} signals into {settings.table}")


@cli.command()
@click.option("--shutdown-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds pollers get to finish their in-flight batch after SIGTERM.")
@with_settings(START_FLAGS)
def start(settings: Any, shutdown_timeout: float) -> None:
    """Start N pollers and the metrics coordinator; SIGTERM drains and exits 0."""
    from pool.logs import setup_logging
    from pool.store import open_store
    from pool.supervisor import run_supervisor

    setup_logging(settings.log_level, "pool")
    store = open_store(settings)
    try:
        _guard_db(settings, store.check_schema)
    finally:
        store.close()
    sys.exit(run_supervisor(settings, shutdown_timeout))


@cli.command()
@click.option("--concurrency", type=click.IntRange(1, 256), default=2, show_default=True)
@with_settings([])
def worker(settings: Any, concurrency: int) -> None:
    """Run a Celery worker for the reference task, scoring signals into signal_scores."""
    from pool.store import create_db_engine
    from pool.store.scores import ScoresStore
    from pool.tasks import create_worker_app

    engine = create_db_engine(settings.db_url)
    try:
        _guard_db(settings, ScoresStore(engine).ensure_table)
    finally:
        engine.dispose()  # no pooled connection may cross into the forked worker children
    app = create_worker_app(settings)
    app.worker_main([
        "worker", "--queues", settings.queue, "--concurrency", str(concurrency),
        "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
        "--hostname", "pool-worker@%h",
    ])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@with_settings([])
def status(settings: Any, as_json: bool) -> None:
    """Processed and unprocessed row counts of the signals table."""
    from pool.store import open_store

    store = open_store(settings)
    try:
        _guard_db(settings, store.check_schema)
        counts = store.counts()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps({"processed": counts.processed, "unprocessed": counts.unprocessed}))
    else:
        click.echo(f"processed:   {counts.processed}\nunprocessed: {counts.unprocessed}")


@cli.command()
@click.option("--wait-for", type=click.IntRange(0), default=0,
              help="Wait until at least this many signals are scored.")
@click.option("--timeout", type=click.FloatRange(min=0), default=300.0, show_default=True)
@with_settings([])
def scores(settings: Any, wait_for: int, timeout: float) -> None:
    """What the reference worker wrote: scored signal count and the top scores."""
    from pool.store import create_db_engine
    from pool.store.scores import ScoresStore

    engine = create_db_engine(settings.db_url)
    store = ScoresStore(engine)
    try:
        _guard_db(settings, store.ensure_table)
        deadline = time.monotonic() + timeout
        summary = store.summary()
        while summary.count < wait_for and time.monotonic() < deadline:
            time.sleep(0.5)
            summary = store.summary()
    finally:
        engine.dispose()
    click.echo(f"scored signals: {summary.count}")
    for signal_id, name, score in summary.top:
        click.echo(f"  signal {signal_id:>8}  {name or '-':<12} score {score:8.3f}")
    if summary.count < wait_for:
        raise PoolError(f"only {summary.count} of {wait_for} signals scored after {timeout:.0f} s")


def _guard_db(settings: Any, action: Callable[[], Any]) -> Any:
    """Run a database action; an unreachable or refusing database becomes a one-line ConfigError."""
    from sqlalchemy.exc import DBAPIError

    from pool.errors import ConfigError
    from pool.redact import redact_url
    from pool.store.base import first_line

    try:
        return action()
    except DBAPIError as exc:
        raise ConfigError(
            f"database {redact_url(settings.db_url)}: {first_line(exc)}"
        ) from None


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PoolError as exc:
        click.echo(f"pool: error: {exc}", err=True)
        sys.exit(exc.exit_code)
