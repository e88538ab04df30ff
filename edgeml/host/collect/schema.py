"""The fleet database's schema, one list of migrations for SQLite and PostgreSQL.

``schema_version`` holds one row per applied migration. :func:`migrate` applies the missing
ones in order, each in its own transaction, under a lock (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: an advisory lock), so several collectors may start at once. A database written by
a newer release is refused, never altered. docs/fleet.md describes every table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgeml.errors import CollectError

# {ID}: the auto-increment key; {JSON}: the record column type; {BLOB}: raw bytes;
# {FLOAT}: a double; {BIGINT}: 64-bit integer. Filled per dialect.
_TYPES = {
    "sqlite": {"ID": "INTEGER PRIMARY KEY AUTOINCREMENT", "JSON": "TEXT", "BLOB": "BLOB",
               "FLOAT": "REAL", "BIGINT": "INTEGER"},
    "postgresql": {"ID": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "JSON": "JSONB",
                   "BLOB": "BYTEA", "FLOAT": "DOUBLE PRECISION", "BIGINT": "BIGINT"},
}

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "devices, versions, records, alerts, deploy events, ingest lag, quarantine", (
        """CREATE TABLE devices (
            device TEXT PRIMARY KEY,
            first_seen {FLOAT} NOT NULL,
            last_seen {FLOAT} NOT NULL,
            last_sent {FLOAT},
            batches {BIGINT} NOT NULL DEFAULT 0,
            last_source TEXT)""",
        """CREATE TABLE versions (
            pipeline TEXT NOT NULL,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            first_seen {FLOAT} NOT NULL,
            last_seen {FLOAT} NOT NULL,
            PRIMARY KEY (pipeline, model, version))""",
        """CREATE TABLE records (
            id {ID},
            record_id TEXT NOT NULL UNIQUE,
            device TEXT NOT NULL,
            stream TEXT NOT NULL,
            pipeline TEXT,
            model TEXT,
            version TEXT,
            ts {FLOAT},
            received {FLOAT} NOT NULL,
            input_key TEXT,
            input_id TEXT,
            role TEXT,
            label TEXT,
            true_label TEXT,
            latency_ms {FLOAT},
            fallback INTEGER,
            error TEXT,
            record {JSON} NOT NULL)""",
        "CREATE INDEX records_pipeline_ts ON records (pipeline, stream, ts)",
        "CREATE INDEX records_input ON records (input_key)",
        """CREATE TABLE alerts (
            record_id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            pipeline TEXT,
            kind TEXT,
            ts {FLOAT},
            received {FLOAT} NOT NULL,
            record {JSON} NOT NULL)""",
        "CREATE INDEX alerts_ts ON alerts (ts)",
        """CREATE TABLE deploy_events (
            record_id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            pipeline TEXT,
            name TEXT,
            version TEXT,
            stage TEXT,
            role TEXT,
            reason TEXT,
            ts {FLOAT},
            received {FLOAT} NOT NULL)""",
        "CREATE INDEX deploy_events_ts ON deploy_events (ts)",
        """CREATE TABLE ingest_lag (
            device TEXT NOT NULL,
            stream TEXT NOT NULL,
            batches {BIGINT} NOT NULL DEFAULT 0,
            records {BIGINT} NOT NULL DEFAULT 0,
            lag_sum_s {FLOAT} NOT NULL DEFAULT 0,
            lag_max_s {FLOAT} NOT NULL DEFAULT 0,
            last_lag_s {FLOAT},
            last_received {FLOAT},
            PRIMARY KEY (device, stream))""",
        """CREATE TABLE quarantine (
            id {ID},
            received {FLOAT} NOT NULL,
            source TEXT,
            topic TEXT,
            device TEXT,
            reason TEXT NOT NULL,
            payload {BLOB})""",
        """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT)""",
    )),
)

#: the newest schema this release writes
SCHEMA_VERSION = MIGRATIONS[-1][0]


def ddl(dialect: str, statement: str) -> str:
    return statement.format(**_TYPES[dialect])


def migrate(conn: Any, dialect: str, execute: Callable[[str, tuple], Any]) -> tuple[int, int]:
    """Bring the schema up to :data:`SCHEMA_VERSION`; (version before, version after).

    ``execute(sql, params)`` runs one statement with ``?`` placeholders on ``conn``."""
    if dialect == "sqlite":
        conn.execute("BEGIN IMMEDIATE")
    else:
        execute("SELECT pg_advisory_xact_lock(?)", (0x6564676D6C,))  # 'edgml'
    try:
        execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                f"applied {_TYPES[dialect]['FLOAT']} NOT NULL, description TEXT)", ())
        cur = execute("SELECT MAX(version) FROM schema_version", ())
        row = cur.fetchone()
        before = int(row[0]) if row and row[0] is not None else 0
        if before > SCHEMA_VERSION:
            raise CollectError(
                f"the fleet database has schema version {before}, newer than this edgeml "
                f"understands ({SCHEMA_VERSION}); upgrade edgeml")
        for version, description, statements in MIGRATIONS:
            if version <= before:
                continue
            for st in statements:
                execute(ddl(dialect, st), ())
            execute("INSERT INTO schema_version (version, applied, description) "
                    "VALUES (?, ?, ?)", (version, time.time(), description))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return before, SCHEMA_VERSION
