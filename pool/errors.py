"""Errors that the CLI turns into one clear line and an exit code."""


class PoolError(Exception):
    """A failure the user can act on; its message is shown as-is, without a traceback."""

    exit_code = 1


class ConfigError(PoolError):
    """Bad configuration: wrong value, unreachable or unprepared database. Exits 2."""

    exit_code = 2
