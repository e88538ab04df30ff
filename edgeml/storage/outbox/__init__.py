"""The durable outbox: versioned outputs wait here until the upstream broker has them.

The package, by job:

- :mod:`.records`: record identity and wire encoding (:func:`record_id`, :func:`chunk_id`,
  :func:`chunk_bytes`, :func:`encode_record`, :func:`pack_record`, :func:`unpack_records`,
  the id-splicing helpers): what is stored is exactly what the uplink sends;
- :mod:`.store`: :class:`Outbox` (SQLite open, ``put_many``, ``next_batch``, ``ack``,
  stats, marks, integrity check);
- :mod:`.budget`: the byte budget and eviction (:class:`StreamPolicy`, drop counters);
- :mod:`.migration`: the schema and the in-place schema 1 -> 2 migration;
- :mod:`.damage`: detecting a damaged outbox file and moving it aside
  (:func:`quarantine`).

Every name importable from ``edgeml.storage.outbox`` before the split still is. Module-level
settings live where they are used: patch ``edgeml.storage.outbox.store.DEDUP_WINDOW``, not
this package's copy.
"""

from __future__ import annotations

from edgeml.errors import OutboxError
from edgeml.storage.outbox.budget import DEFAULT_STREAMS, ON_FULL_POLICIES, StreamPolicy
from edgeml.storage.outbox.damage import QuarantineReport, check_integrity, quarantine
from edgeml.storage.outbox.migration import _SCHEMA_VERSION
from edgeml.storage.outbox.records import (
    ROW_OVERHEAD,
    OutboxChunk,
    chunk_bytes,
    chunk_id,
    encode_record,
    pack_record,
    record_id,
    unpack_records,
)
from edgeml.storage.outbox.store import (
    CHUNK_MAX_BYTES,
    CHUNK_MAX_RECORDS,
    DB_NAME,
    DEDUP_WINDOW,
    LOCK_NAME,
    Outbox,
    PutResult,
)

__all__ = [
    "CHUNK_MAX_BYTES", "CHUNK_MAX_RECORDS", "DB_NAME", "DEDUP_WINDOW", "DEFAULT_STREAMS",
    "LOCK_NAME", "ON_FULL_POLICIES", "ROW_OVERHEAD", "_SCHEMA_VERSION", "Outbox", "OutboxChunk",
    "OutboxError", "PutResult", "QuarantineReport", "StreamPolicy", "check_integrity",
    "chunk_bytes", "chunk_id", "encode_record", "pack_record", "quarantine", "record_id",
    "unpack_records",
]
