"""The `pool` command: parse and validate, then call into the package."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from pool.config import CONFIG_FILE_VARIABLE, ENVIRONMENT, load_settings
from pool.durations import parse_age
from pool.errors import ConfigError, PoolError

# Flags shared by every command; each maps to a Settings field and overrides its PULSE_* variable.
SETTING_FLAGS: list[tuple[str, str, type | click.ParamType]] = [
    ("--db-url", "db_url", str),
    ("--broker-url", "broker_url", str),
    ("--broker-folder", "broker_folder", str),
    ("--table", "table", str),
    ("--queue", "queue", str),
    ("--task-name", "task_name", str),
    ("--log-level", "log_level", str),
    ("--log-format", "log_format", str),
]
START_FLAGS: list[tuple[str, str, type | click.ParamType]] = [
    ("--workers", "workers", str),
    ("--host-id", "host_id", str),
    ("--batch-size", "batch_size", str),
    ("--poll-interval", "poll_interval", str),
    ("--busy-poll-interval", "busy_poll_interval", str),
    ("--lease-seconds", "lease_seconds", str),
    ("--metrics-port", "metrics_port", str),
    ("--metrics-host", "metrics_host", str),
    ("--shutdown-timeout", "shutdown_timeout", str),
    ("--max-attempts", "max_attempts", str),
]


# Longest a command waits for something: a day (a bigger float would overflow the clock maths).
MAX_WAIT_SECONDS = 86400.0
# Row ids as the databases store them: 64-bit signed integers (BIGINT, SQLite INTEGER).
ROW_ID = click.IntRange(-(2**63), 2**63 - 1)


def with_settings(flags: list[tuple[str, str, Any]], reloadable: bool = False) -> Callable:
    """Add setting flags to a command and hand it a validated Settings as `settings`; with
    `reloadable`, also `load_settings_again`, which reads the same sources once more."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            overrides = {key: kwargs.pop(key, None) for _flag, key, _type in SETTING_FLAGS + flags}
            _GIVEN_URLS.extend(str(overrides[key]) for key in ("db_url", "broker_url") if overrides[key])
            overrides["config"] = kwargs.pop("config_file", None)
            if reloadable:
                kwargs["load_settings_again"] = lambda: load_settings(overrides=overrides)
            settings = load_settings(overrides=overrides)
            _GIVEN_URLS.extend((settings.db_url, settings.broker_url))  # a settings file's too
            return command(settings=settings, **kwargs)

        for flag, key, type_ in reversed(SETTING_FLAGS + flags):
            wrapper = click.option(flag, key, type=type_, default=None,
                                   help=f"Overrides {ENVIRONMENT[key]}.")(wrapper)
        return click.option(
            "--config", "config_file", default=None,
            help=f"TOML settings file (or {CONFIG_FILE_VARIABLE}); the environment and flags override it.",
        )(wrapper)

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pool")
def cli() -> None:
    """Relay rows of a SQL signals table into Celery tasks."""


@cli.command("init-db")
@click.option("--notify", is_flag=True,
              help="PostgreSQL: add an insert trigger whose NOTIFY wakes idle pollers at once. It costs "
                   "inserting clients a database-wide lock at each commit; see the README.")
@with_settings([("--shards", "shards", str)])
def init_db(settings: Any, notify: bool) -> None:
    """Create the signals table, or add the relay's columns and index to an existing one."""
    with _store(settings, check=False) as store:
        changes = store.init_schema(notify=notify)
    if not changes.changed:
        click.echo(f"table {settings.table}: already prepared, nothing changed")
        return
    if changes.created_table:
        click.echo(f"table {settings.table}: created")
    if changes.added_columns:
        click.echo(f"table {settings.table}: added column(s) {', '.join(changes.added_columns)}")
    for index in changes.created_indexes:
        click.echo(f"table {settings.table}: created index {index}")
    for extra in changes.created_extras:
        click.echo(f"table {settings.table}: applied {extra}")


@cli.command()
@click.option("--count", type=click.IntRange(1, 100_000_000), default=10_000, show_default=True)
@click.option("--chunk", type=click.IntRange(1, 1_000_000), default=5_000, show_default=True,
              help="Rows per insert transaction.")
@with_settings([])
def seed(settings: Any, count: int, chunk: int) -> None:
    """Insert COUNT synthetic signals (prepares the table first if needed)."""
    from pool.seeding import generate_signals

    with _store(settings, check=False) as store:
        store.init_schema()
        rows = generate_signals(count)
        with click.progressbar(length=count, label="seeding signals", file=sys.stderr) as bar:
            remaining = count
            while remaining:
                batch = [next(rows) for _ in range(min(chunk, remaining))]
                store.insert_signals(batch)
                remaining -= len(batch)
                bar.update(len(batch))
    click.echo(f"inserted {count} signals into {settings.table}")


@cli.command()
@with_settings(START_FLAGS, reloadable=True)
def start(settings: Any, load_settings_again: Callable[[], Any]) -> None:
    """Start N pollers and the coordinator; SIGHUP reloads settings, SIGTERM drains and exits 0."""
    from pool.logs import setup_logging
    from pool.supervisor import Supervisor

    setup_logging(settings.log_level, "pool", settings.log_format,
                  secret_urls=(settings.db_url, settings.broker_url))
    from pool.broker_check import warn_if_unreachable

    supervisor = Supervisor(settings, load_settings_again)
    with supervisor.prepared():  # the fork server imports pool's libraries meanwhile
        with _store(settings):
            pass  # reachable and prepared, or a one-line error and exit 2
        warn_if_unreachable(settings)  # usable as configured, or a one-line error and exit 2
        code = supervisor.run()
    sys.exit(code)


# The standalone programs take the start flags that concern them.
POLLER_FLAGS = [flag for flag in START_FLAGS if flag[1] not in ("metrics_port", "metrics_host")]
COORDINATOR_FLAGS = [flag for flag in START_FLAGS if flag[1] in ("workers", "metrics_port", "metrics_host")]


@cli.command()
@click.option("--slot", required=True, metavar="K",
              help="Which of the PULSE_WORKERS pollers of this host to be, from 0 to PULSE_WORKERS-1.")
@with_settings(POLLER_FLAGS)
def poller(settings: Any, slot: str) -> None:
    """Run one poller on its own, for supervisord (one program per slot); SIGTERM drains and exits 0.

    Needs PROMETHEUS_MULTIPROC_DIR, shared with `pool coordinator`. Settings change by restarting
    it: there is no reload."""
    from pool.standalone import check_slot, run_poller

    index = _parse_count("--slot", slot, 255, minimum=0)
    check_slot(index, settings.workers)
    _check_standalone(settings, "pool poller")
    run_poller(settings, index)


@cli.command()
@with_settings(COORDINATOR_FLAGS)
def coordinator(settings: Any) -> None:
    """Run the coordinator on its own (metrics, health, status page) for the pollers of this host.

    Needs PROMETHEUS_MULTIPROC_DIR, shared with the `pool poller` programs, and PULSE_WORKERS, how
    many there are. SIGTERM stops it with exit 0."""
    from pool.standalone import run_coordinator

    _check_standalone(settings, "pool coordinator")
    run_coordinator(settings)


def _check_standalone(settings: Any, command: str) -> None:
    """What `pool start` checks before it spawns anything, plus the shared metrics directory."""
    from pool.broker_check import warn_if_unreachable
    from pool.standalone import metrics_dir

    metrics_dir(command)
    with _store(settings):
        pass  # reachable and prepared, or a one-line error and exit 2
    warn_if_unreachable(settings)


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
@click.option("--url", default=None,
              help="The coordinator to ask (default: http://PULSE_METRICS_HOST:PULSE_METRICS_PORT).")
@with_settings([("--metrics-port", "metrics_port", str), ("--metrics-host", "metrics_host", str)])
def status(settings: Any, as_json: bool, url: str | None) -> None:
    """Pollers, backlog, lag, dead rows and broker depth; exit 0 only when the pool is healthy.

    Row counts come from the database; the rest from the running coordinator. Exit codes:
    0 healthy, 1 unhealthy or not running, 2 configuration error or database unreachable."""
    from pool.status_client import StatusReport, coordinator_url, fetch_status

    base = coordinator_url(settings, url)
    with _store(settings) as store:
        counts = store.counts()
    snapshot, error = fetch_status(base) if base else (None, None)
    report = StatusReport(counts=counts, coordinator=base, status=snapshot, error=error)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(0 if report.healthy else 1)


@cli.command()
@click.option("--url", default=None,
              help="The coordinator to ask (default: http://PULSE_METRICS_HOST:PULSE_METRICS_PORT).")
@with_settings([("--metrics-port", "metrics_port", str), ("--metrics-host", "metrics_host", str)])
def reload(settings: Any, url: str | None) -> None:
    """Make a running `pool start` re-read its settings, as SIGHUP does."""
    from pool.status_client import client_headers, coordinator_url, request_reload

    base = coordinator_url(settings, url)
    if base is None:
        raise ConfigError("PULSE_METRICS_PORT is 0, so the coordinator's port is unknown: pass --url")
    error = request_reload(base, client_headers(settings))
    if error:
        raise PoolError(error)
    click.echo(f"asked the pool at {base} to reload its settings")


@cli.command()
@click.option("--wait-for", type=click.IntRange(0), default=0,
              help="Wait until at least this many signals are scored.")
@click.option("--timeout", type=click.FloatRange(min=0, max=MAX_WAIT_SECONDS), default=300.0,
              show_default=True)
@with_settings([])
def scores(settings: Any, wait_for: int, timeout: float) -> None:
    """What the reference worker wrote: scored signal count and the top scores."""
    from pool.store import create_db_engine
    from pool.store.scores import ScoresStore

    if math.isnan(timeout):  # FloatRange lets NaN through: it compares as within any range
        raise ConfigError("--timeout must be a number of seconds, got nan")
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


@cli.group()
def dead() -> None:
    """Rows that used up their attempts: list, requeue, purge."""


@dead.command("list")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per row.")
@with_settings([])
def dead_list(settings: Any, limit: int, as_json: bool) -> None:
    """Dead rows, oldest death first: id, attempts, last error, age."""
    with _store(settings) as store:
        rows = store.list_dead(limit)
        total = store.count_dead()
    if as_json:
        for row in rows:
            click.echo(json.dumps({"id": row.id, "attempts": row.attempts, "last_error": row.last_error,
                                   "age_seconds": round(row.age_seconds, 1)}))
        return
    if not rows:
        click.echo("no dead rows")
        return
    click.echo(f"{'id':>10}  {'attempts':>8}  {'age':>8}  last error")
    for row in rows:
        error = (row.last_error or "").replace("\n", " ")
        click.echo(f"{row.id:>10}  {row.attempts:>8}  {format_age(row.age_seconds):>8}  {error[:90]}")
    if total > len(rows):
        click.echo(f"... {total - len(rows)} more (use --limit)")


@dead.command("requeue")
@click.option("--id", "ids", type=ROW_ID, multiple=True, help="A dead row's id; repeat for several.")
@click.option("--all", "all_rows", is_flag=True, help="Every dead row.")
@with_settings([])
def dead_requeue(settings: Any, ids: tuple[int, ...], all_rows: bool) -> None:
    """Give dead rows a fresh set of attempts; pollers pick them up at once."""
    if bool(ids) == all_rows:
        raise click.UsageError("give either --id (one or more) or --all")
    with _store(settings) as store:
        count = store.requeue_dead(None if all_rows else list(ids))
    click.echo(f"requeued {count} dead row(s)")


@dead.command("purge")
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="Delete dead rows that died at least this long ago, e.g. 30m, 12h, 7d.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@with_settings([])
def dead_purge(settings: Any, older_than: str, yes: bool) -> None:
    """Delete dead rows for good."""
    try:
        seconds = parse_age(older_than)
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from None
    if not yes:
        click.confirm(f"delete dead rows older than {older_than} from {settings.table}?", abort=True)
    with _store(settings) as store:
        count = store.purge_dead(seconds)
    click.echo(f"purged {count} dead row(s)")


@cli.command()
@click.option("--processed-older-than", "older_than", required=True, metavar="DURATION",
              help="Delete processed rows whose timestamp is at least this old by the database clock, "
                   "e.g. 30m, 12h, 7d. Rows with a NULL timestamp are kept.")
@click.option("--batch-size", "batch_size", default="5000", show_default=True, metavar="N",
              help="Rows deleted per transaction (not PULSE_BATCH_SIZE).")
@with_settings([])
def prune(settings: Any, older_than: str, batch_size: str) -> None:
    """Delete old processed rows in short batches, so the table does not grow forever.

    Unprocessed and dead rows are never deleted (dead ones: `pool dead purge`), nor are rows
    whose timestamp is NULL."""
    from pool.retention import Pruner

    try:
        seconds = parse_age(older_than)
    except ValueError as exc:
        raise ConfigError(f"--processed-older-than: {exc}") from None
    batch_rows = _parse_count("--batch-size", batch_size, 1_000_000)
    with _store(settings) as store:
        pruner = Pruner(store, seconds, batch_rows)
        total = store.count_prunable(seconds)
        with click.progressbar(length=total, label="pruning processed rows", file=sys.stderr) as bar:
            pruned = pruner.run(progress=bar.update)
    click.echo(f"pruned {pruned} processed rows older than {older_than.strip()} from {settings.table}")


def _parse_count(flag: str, raw: str, maximum: int, minimum: int = 1) -> int:
    """A whole number from `minimum` to `maximum`, or a one-line ConfigError naming the flag."""
    try:
        value = int(raw.strip())
    except ValueError:
        shown = repr(raw) if len(raw) <= 40 else repr(raw[:40]) + "…"
        raise ConfigError(f"{flag} must be a whole number, got {shown}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{flag} must be between {minimum} and {maximum}, got {value}")
    return value


def format_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@contextlib.contextmanager
def _store(settings: Any, check: bool = True) -> Iterator[Any]:
    """An open store (schema-checked unless `check` is False); database errors become one line."""
    from sqlalchemy.exc import DBAPIError

    from pool.store import open_store

    store = open_store(settings)
    try:
        if check:
            store.check_schema()
        yield store
    except DBAPIError as exc:
        raise _db_error(settings, exc) from None
    finally:
        store.close()


def _guard_db(settings: Any, action: Callable[[], Any]) -> Any:
    """Run a database action; an unreachable or refusing database becomes a one-line ConfigError."""
    from sqlalchemy.exc import DBAPIError

    try:
        return action()
    except DBAPIError as exc:
        raise _db_error(settings, exc) from None


def _db_error(settings: Any, exc: Exception) -> PoolError:
    from pool.errors import ConfigError
    from pool.redact import redact_text, redact_url
    from pool.store.base import first_line

    reason = redact_text(first_line(exc), settings.db_url)
    return ConfigError(f"database {redact_url(settings.db_url)}: {reason}")


# The database and broker URLs this command was given, by flag or environment: an error line
# hides their passwords even where a library quoted one without its URL.
_GIVEN_URLS: list[str] = []


def _redacted(message: str) -> str:
    from pool.redact import redact_text

    given = [os.environ.get(ENVIRONMENT[key], "") for key in ("db_url", "broker_url")]
    return redact_text(message, *_GIVEN_URLS, *given)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `pool dead` alone: the group's help
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # One line, as for every other error: the usage text is one -h away.
        context = getattr(exc, "ctx", None)
        hint = f" (see {context.command_path} -h)" if isinstance(exc, click.UsageError) and context else ""
        message = " ".join(exc.format_message().split())
        click.echo(f"pool: error: {_redacted(message)}{hint}", err=True)
        sys.exit(exc.exit_code)
    except PoolError as exc:
        click.echo(f"pool: error: {_redacted(str(exc))}", err=True)
        sys.exit(exc.exit_code)
