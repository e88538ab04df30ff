"""The storage packages keep every name their single-module predecessors offered: the public
names of ``edgeml.storage.rawlog`` and ``edgeml.storage.outbox`` before the split, and what
the tree imports from them (device core, uplink, CLI, host tools, tests, benchmarks)."""

from __future__ import annotations

import importlib

import pytest

RAWLOG = (
    "FORMAT_VERSION", "LOCK_NAME", "MAX_PAYLOAD_BYTES", "MAX_TOPIC_BYTES", "PIPELINE_RE",
    "RECORD_MAGIC", "RECORD_OVERHEAD", "SEAL_FORMAT", "SEAL_SUFFIX", "SEGMENT_MAGIC",
    "SEGMENT_RE", "SNAPSHOT_FORMAT", "RawLog", "RawLogBusyError", "RawLogError",
    "RawLogReader", "RawRecord", "RecoveryReport", "SegmentInfo", "VerifyReport",
    "check_manifest", "list_pipelines", "open_reader", "pipeline_dir", "read_manifest",
    "verify_snapshot",
)
OUTBOX = (
    "CHUNK_MAX_BYTES", "CHUNK_MAX_RECORDS", "DB_NAME", "DEDUP_WINDOW", "DEFAULT_STREAMS",
    "LOCK_NAME", "ON_FULL_POLICIES", "ROW_OVERHEAD", "_SCHEMA_VERSION", "Outbox", "OutboxChunk",
    "OutboxError", "PutResult", "StreamPolicy", "chunk_bytes", "chunk_id", "encode_record",
    "pack_record", "record_id", "unpack_records",
    # new with the split
    "QuarantineReport", "check_integrity", "quarantine",
)


@pytest.mark.parametrize(("module", "names"), [("edgeml.storage.rawlog", RAWLOG),
                                               ("edgeml.storage.outbox", OUTBOX)])
def test_package_keeps_its_names(module: str, names: tuple[str, ...]):
    mod = importlib.import_module(module)
    assert [n for n in names if not hasattr(mod, n)] == []
    assert set(mod.__all__) >= {n for n in names if not n.startswith("_")}


def test_submodules_by_job():
    from edgeml.storage.outbox import budget, migration, records, store
    from edgeml.storage.rawlog import format, reader, snapshot, writer

    assert writer.RawLog.__module__ == "edgeml.storage.rawlog.writer"
    assert reader.open_reader.__module__ == "edgeml.storage.rawlog.reader"
    assert snapshot.verify_snapshot.__module__ == "edgeml.storage.rawlog.snapshot"
    assert format.RawRecord.__module__ == "edgeml.storage.rawlog.format"
    assert store.Outbox.__module__ == "edgeml.storage.outbox.store"
    assert records.pack_record.__module__ == "edgeml.storage.outbox.records"
    assert budget.StreamPolicy.__module__ == "edgeml.storage.outbox.budget"
    assert migration.migrate_v1.__module__ == "edgeml.storage.outbox.migration"


def test_one_logger_name_per_store():
    """Log records keep the logger names operators filter on (docs/rawlog.md shows them)."""
    from edgeml.storage.outbox import damage, migration, store
    from edgeml.storage.rawlog import format, reader, writer

    assert {m.log.name for m in (format, reader, writer)} == {"edgeml.storage.rawlog"}
    assert {m.log.name for m in (store, migration, damage)} == {"edgeml.storage.outbox"}
