"""The outbox schema and its in-place migration: schema 1 (one row per record, table
``records``) becomes schema 2 (chunks) in one transaction when an old outbox is opened."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import msgpack

from edgeml.errors import OutboxError
from edgeml.storage.outbox.records import _prepend_id, chunk_bytes, encode_record

log = logging.getLogger("edgeml.storage.outbox")

_SCHEMA_VERSION = 2  # 1: one row per record (table ``records``); 2: chunks (migrated at open)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    chunk_id TEXT NOT NULL UNIQUE,
    count INTEGER NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_stream ON chunks (stream, seq, created, size, count);
CREATE TABLE IF NOT EXISTS counters (
    stream TEXT PRIMARY KEY,
    dropped INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    reported_dropped INTEGER NOT NULL DEFAULT 0,
    reported_refused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS marks (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def _v1_record(rid: str, payload: bytes) -> bytes:
    """A schema-1 row (record without its id) as a schema-2 record: ``record_id`` spliced in
    front without decoding; a damaged or non-map payload the way the uplink used to send it."""
    spliced = _prepend_id(msgpack.Packer(use_bin_type=True), rid, payload)
    if spliced is not None:
        return spliced
    try:
        fields: Any = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        fields = {"error": f"undecodable record: {exc}"}
    if not isinstance(fields, dict):
        fields = {"value": fields}
    return encode_record({"record_id": rid, **fields})


def migrate_v1(db: sqlite3.Connection) -> None:
    """Schema 1 (a row per record) to chunks, in place and in one transaction: every row
    becomes a chunk of one with the same ``seq`` (order and leases unchanged)."""
    db.create_function("edgeml_v1_record", 2, _v1_record, deterministic=True)
    db.create_function("edgeml_chunk_bytes", 3, chunk_bytes, deterministic=True)
    db.execute("BEGIN IMMEDIATE")
    try:
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='records'"
                      ).fetchone():
            n = db.execute(
                "INSERT INTO chunks (seq, stream, chunk_id, count, created, size, payload) "
                "SELECT seq, stream, record_id || '+1', 1, created, 0, "
                "edgeml_v1_record(record_id, payload) FROM records ORDER BY seq").rowcount
            db.execute("UPDATE chunks SET size = edgeml_chunk_bytes(stream, chunk_id, payload)")
            db.execute("DROP TABLE records")
            log.info("outbox: migrated %d record(s) from schema 1 to chunks", n)
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def ensure_schema(db: sqlite3.Connection, db_path: Path) -> None:
    """Bring an opened outbox database to the current schema (create it when new, migrate a
    schema-1 file in place); an unknown (newer) schema is an OutboxError."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, 1, _SCHEMA_VERSION):
        raise OutboxError(f"{db_path} has schema version {version}; this edgeml "
                          f"knows {_SCHEMA_VERSION}")
    if version == 1:
        migrate_v1(db)
    db.executescript(_SCHEMA)
    db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
