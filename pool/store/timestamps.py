"""The user's timestamp column read as epoch seconds in SQL, whatever its type and its values.

The coordinator's lag and retention do arithmetic on that column. A seed-shaped table may hold
times as timestamptz, timestamp or date, as ISO-8601 text, or as numbers of epoch seconds (on
SQLite, any of these in one column); a value may be infinite, NULL, unreadable text or a number
past any calendar. Every expression here gives epoch seconds, or NULL for a value that names no
time within years 1 to 9999 (what the payload can represent), and none can fail on any value: one
failing row would fail the whole statement, and with it the status or the prune. Readings agree
with the payload: numbers are epoch seconds, times without an offset are UTC.
"""

from __future__ import annotations

TIME, NUMBER, TEXT = "time", "number", "text"

# PostgreSQL base types (pg_type.typname) the column may have, by how they are read.
POSTGRES_KINDS = {
    "timestamptz": TIME, "timestamp": TIME, "date": TIME,
    "int2": NUMBER, "int4": NUMBER, "int8": NUMBER, "numeric": NUMBER, "float4": NUMBER, "float8": NUMBER,
    "text": TEXT, "varchar": TEXT, "bpchar": TEXT, "citext": TEXT,
}
SUPPORTED = "timestamptz, timestamp, date, text (ISO-8601) or a number of epoch seconds"

EARLIEST_EPOCH = -62135596800  # 0001-01-01T00:00:00Z
LATEST_EPOCH = 253402300799  # 9999-12-31T23:59:59Z

# ISO-8601 as written by people and programs: date, optional time (T or space), optional Z or
# offset. Groups: year, month, day, hour, minute, second, offset sign, hours, minutes. Written
# without ':' before a word character, which SQLAlchemy's text() would take for a parameter.
ISO_TEXT = (
    r"^\s*(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2}(?:\.\d+)?))?)?"
    r"\s*(?:[Zz]|([+-])(\d{2})(?::?(\d{2}))?)?\s*$"
)


def postgres_epoch(column: str, kind: str) -> str:
    """Epoch seconds (double precision) of `column`, or NULL; never an error."""
    if kind == TIME:
        # EXTRACT reads a naive timestamp or a date as UTC, as the payload does.
        epoch = f"EXTRACT(EPOCH FROM {column})"
        return (f"CASE WHEN isfinite({column}) AND {epoch} BETWEEN {EARLIEST_EPOCH} AND {LATEST_EPOCH}"
                f" THEN {epoch}::float8 END")
    if kind == NUMBER:
        # Compared in the column's own type first: a numeric past float8's range, NaN or
        # infinity never reaches the cast.
        return f"CASE WHEN {column} BETWEEN {EARLIEST_EPOCH} AND {LATEST_EPOCH} THEN {column}::float8 END"
    if kind == TEXT:
        return _postgres_text_epoch(column)
    raise ValueError(f"unknown timestamp kind {kind!r}")


def _postgres_text_epoch(column: str) -> str:
    # A cast of the text (::timestamptz) fails the statement on the first unreadable value
    # (PostgreSQL before 16 cannot test for that), so the parts are matched and checked, each
    # CASE branch only reached when the ones before it ruled out what would fail.
    def n(i: int) -> str:
        return f"COALESCE(m[{i}]::int, 0)"

    return (
        f"(SELECT CASE"
        f" WHEN m IS NULL OR m[1]::int < 1 OR m[2]::int NOT BETWEEN 1 AND 12 THEN NULL"
        f" WHEN m[3]::int NOT BETWEEN 1 AND"
        f" EXTRACT(DAY FROM make_date(m[1]::int, m[2]::int, 1) + INTERVAL '1 month - 1 day')"
        f" OR {n(4)} > 23 OR {n(5)} > 59 OR COALESCE(m[6]::float8, 0) >= 60 THEN NULL"
        f" ELSE EXTRACT(EPOCH FROM make_date(m[1]::int, m[2]::int, m[3]::int))::float8"
        f" + {n(4)} * 3600 + {n(5)} * 60 + COALESCE(m[6]::float8, 0)"
        f" - CASE m[7] WHEN '-' THEN -1 WHEN '+' THEN 1 ELSE 0 END * ({n(8)} * 3600 + {n(9)} * 60)"
        f" END FROM regexp_match({column}::text, '{ISO_TEXT}') AS r(m))"
    )


def postgres_older_than(column: str, kind: str, param: str) -> str:
    """A condition: `column` lies at least :param seconds before the statement's start."""
    if kind == TIME:
        # Compared as a time against statement_timestamp(), stable within the statement, so that
        # an index on the column, where a user has one, serves it; infinite values compare
        # without error. Naive times are UTC through the caller's SET LOCAL TimeZone.
        return f"{column} <= statement_timestamp() - make_interval(secs => :{param})"
    if kind == NUMBER:
        # numeric on the right: a float8 cast of a huge numeric value would fail the statement.
        return f"{column} <= EXTRACT(EPOCH FROM statement_timestamp()) - CAST(:{param} AS NUMERIC)"
    return f"{postgres_epoch(column, kind)} <= EXTRACT(EPOCH FROM statement_timestamp())::float8 - :{param}"


def sqlite_julian_day(column: str) -> str:
    """The Julian day of `column`, or NULL; never an error.

    julianday() alone reads a bare number as a Julian day; 'unixepoch' makes it epoch seconds,
    and gives NULL for text, which the second reading takes as ISO-8601. Values out of SQLite's
    calendar, blobs and unreadable text give NULL."""
    return f"COALESCE(julianday({column}, 'unixepoch'), julianday({column}))"
