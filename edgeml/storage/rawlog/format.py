"""The raw log's bytes: segment file header, record framing and CRC, segment and seal file
names, seal documents, and the parser that walks a segment record by record and resynchronises
after a damaged region. Everything here is pure (no state beyond a file read); the writer,
the reader and the snapshot code all build on it. See ``docs/rawlog.md`` for the byte layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import RawLogError

log = logging.getLogger("edgeml.storage.rawlog")

FORMAT_VERSION = 1
SNAPSHOT_FORMAT = "edgeml-rawlog-snapshot"
SEAL_FORMAT = "edgeml-rawlog-seal"

# Segment file header: magic, format version, header size, flags, first seq, created (unix s).
SEGMENT_MAGIC = b"EDGEMLRL"
_FILE_HDR = struct.Struct("<8sHHIQd")  # 32 bytes
# Record: header (magic, body length, crc32 of the body), then the body.
# 0xED followed by 0x52 ('R') is never valid UTF-8, so text/JSON payloads cannot fake a record
# start when a reader resynchronises after a corrupt record.
RECORD_MAGIC = b"\xedRLg"
_MAGIC_INT = int.from_bytes(RECORD_MAGIC, "little")
_REC_HDR = struct.Struct("<III")  # 12 bytes
_BODY = struct.Struct("<QdH")  # seq, received, topic length: 18 bytes, then topic, then payload
RECORD_OVERHEAD = _REC_HDR.size + _BODY.size
MAX_TOPIC_BYTES = 65535
MAX_PAYLOAD_BYTES = 256 * 2**20
_MAX_BODY = _BODY.size + MAX_TOPIC_BYTES + MAX_PAYLOAD_BYTES

SEGMENT_RE = re.compile(r"^seg-(\d{20})\.log$")
SEAL_SUFFIX = ".seal.json"
LOCK_NAME = "writer.lock"
PIPELINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ---- records and reports -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RawRecord:
    """One archived message: ``payload`` is byte-identical to what the broker delivered."""

    seq: int
    received: float
    topic: str
    payload: bytes
    segment: str


@dataclass(frozen=True)
class SegmentInfo:
    """One segment file. ``first_seq`` is the seq the segment starts at (from its name)."""

    path: Path
    first_seq: int
    last_seq: int | None
    records: int
    bytes: int
    first_received: float | None
    last_received: float | None
    min_received: float | None
    max_received: float | None
    sealed: bool
    sha256: str | None
    corrupt_records: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.name, "first_seq": self.first_seq, "last_seq": self.last_seq,
            "records": self.records, "bytes": self.bytes,
            "first_received": self.first_received, "last_received": self.last_received,
            "min_received": self.min_received, "max_received": self.max_received,
            "sealed": self.sealed, "sha256": self.sha256,
            "corrupt_records": self.corrupt_records,
        }


# ---- helpers -------------------------------------------------------------------------------
def pipeline_dir(data_dir: str | Path, pipeline: str) -> Path:
    """``data_dir/rawlog/<pipeline>``; the name is checked so it cannot leave the data dir."""
    if not PIPELINE_RE.match(pipeline):
        raise RawLogError(f"invalid pipeline name {pipeline!r} (letters, digits, '.', '_', '-')")
    return Path(data_dir) / "rawlog" / pipeline


def list_pipelines(data_dir: str | Path) -> list[str]:
    """Names of the pipelines that have a raw-input log under ``data_dir``."""
    base = Path(data_dir) / "rawlog"
    try:
        return sorted(p.name for p in base.iterdir()
                      if p.is_dir() and PIPELINE_RE.match(p.name))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RawLogError(f"{base}: cannot list: {exc.strerror}") from exc


def _segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


def _seal_path(seg: Path) -> Path:
    return seg.with_name(seg.stem + SEAL_SUFFIX)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check(data: bytes, view: memoryview, pos: int, n: int,
           min_seq: int) -> tuple[int, int, float, int] | None:
    """A valid record at ``pos``: (end, seq, received, topic length), else None."""
    if n - pos < RECORD_OVERHEAD:
        return None
    magic, blen, crc = _REC_HDR.unpack_from(data, pos)
    end = pos + 12 + blen
    if magic != _MAGIC_INT or blen < 18 or blen > _MAX_BODY or end > n:
        return None
    if zlib.crc32(view[pos + 12:end]) != crc:
        return None
    seq, received, tlen = _BODY.unpack_from(data, pos + 12)
    if seq < min_seq or 18 + tlen > blen:
        return None
    return end, seq, received, tlen


def _walk(data: bytes, start: int, min_seq: int) -> Iterator[tuple]:
    """Records and damaged regions of one segment's bytes, in order.

    Yields ``(pos, end, seq, received, tlen)`` for a valid record and ``(pos, end, None,
    is_tail, 0)`` for a damaged region: bytes that are no record, up to the next valid record
    (found by scanning for the record magic), or to the end of the data (``is_tail``).
    """
    view = memoryview(data)
    n = len(data)
    pos = start
    find = data.find
    while pos < n:
        hit = _check(data, view, pos, n, min_seq)
        if hit is not None:
            end, seq, received, tlen = hit
            yield pos, end, seq, received, tlen
            min_seq = seq + 1
            pos = end
            continue
        nxt = pos
        while True:
            nxt = find(RECORD_MAGIC, nxt + 1)
            if nxt < 0 or _check(data, view, nxt, n, min_seq) is not None:
                break
        if nxt < 0:
            yield pos, n, None, True, 0
            return
        yield pos, nxt, None, False, 0
        pos = nxt


@dataclass
class _Meta:
    """What a scan of one segment found."""

    records: int = 0
    first_rec_seq: int | None = None
    last_seq: int | None = None
    first_received: float | None = None
    last_received: float | None = None
    min_received: float | None = None
    max_received: float | None = None
    good_end: int = _FILE_HDR.size   # end of the last valid record
    tail_start: int | None = None    # start of trailing bytes that hold no valid record
    corrupt: int = 0                 # damaged regions before the tail
    header_ok: bool = True

    def note(self, seq: int, received: float) -> None:
        if self.records == 0:
            self.first_rec_seq = seq
            self.first_received = self.min_received = self.max_received = received
        else:
            if received < self.min_received:  # type: ignore[operator]
                self.min_received = received
            if received > self.max_received:  # type: ignore[operator]
                self.max_received = received
        self.records += 1
        self.last_seq = seq
        self.last_received = received


def _header_ok(data: bytes) -> bool:
    if len(data) < _FILE_HDR.size:
        return False
    magic, version, hsize, _flags, _first, _created = _FILE_HDR.unpack_from(data, 0)
    return magic == SEGMENT_MAGIC and version == FORMAT_VERSION and hsize == _FILE_HDR.size


def _scan(data: bytes, first_seq: int) -> _Meta:
    meta = _Meta(header_ok=_header_ok(data))
    for pos, end, seq, received, _tlen in _walk(data, _FILE_HDR.size, first_seq):
        if seq is None:
            if received:  # is_tail
                meta.tail_start = pos
            else:
                meta.corrupt += 1
            continue
        meta.note(seq, received)
        meta.good_end = end
    return meta


def _parse_seal(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable seal (%s); treating the segment as unsealed", path, exc)
        return None
    ok = (isinstance(doc, dict) and doc.get("format") == SEAL_FORMAT
          and isinstance(doc.get("sha256"), str) and isinstance(doc.get("records"), int))
    if not ok:
        log.warning("%s: not a valid seal; treating the segment as unsealed", path)
        return None
    return doc


def _info_from_seal(path: Path, first_seq: int, seal: dict) -> SegmentInfo:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    return SegmentInfo(
        path=path, first_seq=first_seq, last_seq=seal.get("last_seq"),
        records=seal["records"], bytes=size,
        first_received=seal.get("first_received"), last_received=seal.get("last_received"),
        min_received=seal.get("min_received"), max_received=seal.get("max_received"),
        sealed=True, sha256=seal["sha256"], corrupt_records=seal.get("corrupt_records", 0),
    )


def _info_from_meta(path: Path, first_seq: int, meta: _Meta, size: int, *,
                    sealed: bool = False, sha256: str | None = None) -> SegmentInfo:
    return SegmentInfo(
        path=path, first_seq=first_seq, last_seq=meta.last_seq, records=meta.records,
        bytes=size, first_received=meta.first_received, last_received=meta.last_received,
        min_received=meta.min_received, max_received=meta.max_received,
        sealed=sealed, sha256=sha256, corrupt_records=meta.corrupt,
    )


def _seal_doc(info: SegmentInfo) -> dict[str, Any]:
    return {
        "format": SEAL_FORMAT, "version": FORMAT_VERSION, "segment": info.name,
        "sha256": info.sha256, "bytes": info.bytes, "first_seq": info.first_seq,
        "last_seq": info.last_seq, "records": info.records,
        "first_received": info.first_received, "last_received": info.last_received,
        "min_received": info.min_received, "max_received": info.max_received,
        "corrupt_records": info.corrupt_records, "sealed_at": time.time(),
    }


