"""The raw-input archive: every accepted message, exactly as it arrived, with a sequence number.

One :class:`RawLog` per pipeline lives in ``data_dir/rawlog/<pipeline>/``. It is an append-only
series of segment files, each record framed with its length and a CRC32 so that a crash or a
bad disk block costs the damaged record only, never the archive. Closed segments are sealed
with their sha256 so that a range of them is a data version that can be cited and checked
(:meth:`RawLog.snapshot`, :func:`verify_snapshot`). See ``docs/rawlog.md`` for the byte layout.

Why a home-made format and not sqlite: appends must cost a few microseconds (the archive must
never be what limits the daemon), recovery must be "cut the torn tail", and the files must be
readable by anyone with ``struct`` and a format description.

The package, by job:

- :mod:`.format`: the bytes (segment header, record framing and CRC, file names, seal files,
  the walk/resync parser);
- :mod:`.writer`: :class:`RawLog` (append, roll, seal, retention, fsync, recovery at open);
- :mod:`.reader`: :func:`open_reader` / :class:`RawLogReader` (iteration, damaged regions);
- :mod:`.snapshot`: snapshot manifests (:func:`read_manifest`, :func:`check_manifest`,
  :func:`verify_snapshot`).

Every name importable from ``edgeml.storage.rawlog`` before the split still is.
"""

from __future__ import annotations

from edgeml.errors import RawLogBusyError, RawLogError
from edgeml.storage.rawlog.format import (
    FORMAT_VERSION,
    LOCK_NAME,
    MAX_PAYLOAD_BYTES,
    MAX_TOPIC_BYTES,
    PIPELINE_RE,
    RECORD_MAGIC,
    RECORD_OVERHEAD,
    SEAL_FORMAT,
    SEAL_SUFFIX,
    SEGMENT_MAGIC,
    SEGMENT_RE,
    SNAPSHOT_FORMAT,
    RawRecord,
    SegmentInfo,
    list_pipelines,
    pipeline_dir,
)
from edgeml.storage.rawlog.reader import RawLogReader, open_reader
from edgeml.storage.rawlog.snapshot import (
    VerifyReport,
    check_manifest,
    read_manifest,
    verify_snapshot,
)
from edgeml.storage.rawlog.writer import RawLog, RecoveryReport

__all__ = [
    "FORMAT_VERSION", "LOCK_NAME", "MAX_PAYLOAD_BYTES", "MAX_TOPIC_BYTES", "PIPELINE_RE",
    "RECORD_MAGIC", "RECORD_OVERHEAD", "SEAL_FORMAT", "SEAL_SUFFIX", "SEGMENT_MAGIC",
    "SEGMENT_RE", "SNAPSHOT_FORMAT", "RawLog", "RawLogBusyError", "RawLogError",
    "RawLogReader", "RawRecord", "RecoveryReport", "SegmentInfo", "VerifyReport",
    "check_manifest", "list_pipelines", "open_reader", "pipeline_dir", "read_manifest",
    "verify_snapshot",
]
