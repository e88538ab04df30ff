"""The raw-input archive: every accepted message, exactly as it arrived, with a sequence number.

One :class:`RawLog` per pipeline lives in ``data_dir/rawlog/<pipeline>/``. It is an append-only
series of segment files, each record framed with its length and a CRC32 so that a crash or a
bad disk block costs the damaged record only, never the archive. Closed segments are sealed
with their sha256 so that a range of them is a data version that can be cited and checked
(:meth:`RawLog.snapshot`, :func:`verify_snapshot`). See ``docs/rawlog.md`` for the byte layout.

Why a home-made format and not sqlite: appends must cost a few microseconds (the archive must
never be what limits the daemon), recovery must be "cut the torn tail", and the files must be
readable by anyone with ``struct`` and a format description.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import RawLogBusyError, RawLogError
from edgeml.topics import matcher as topic_matcher

log = logging.getLogger(__name__)

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
_DIRECT_WRITE_BYTES = 256 * 1024  # larger payloads skip the buffer (no copy: writev)

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
class RecoveryReport:
    """What opening the log had to cut from the tail of its last segment (if anything)."""

    segment: str | None
    truncated_bytes: int
    records_kept: int
    detail: str = ""


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


@dataclass(frozen=True)
class VerifyReport:
    """Result of checking an archive against a snapshot manifest."""

    ok: bool
    checked: int
    missing: tuple[str, ...]
    changed: tuple[str, ...]
    problems: tuple[str, ...]


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_all(fd: int, *parts: bytes | bytearray | memoryview) -> None:
    """One write()/writev() call; finishes a short write (rare: full disk, signals)."""
    total = sum(len(p) for p in parts)
    n = os.write(fd, parts[0]) if len(parts) == 1 else os.writev(fd, parts)
    if n == total:
        return
    rest = memoryview(b"".join(parts))[n:]
    while rest:
        k = os.write(fd, rest)
        if k <= 0:
            raise OSError(28, "short write")
        rest = rest[k:]


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


def _snapshot_id(segments: Sequence[Mapping[str, Any]]) -> str:
    """The data version: sha256 over ``"<file> <sha256>\\n"`` of every cited segment."""
    text = "".join(f"{s['file']} {s['sha256']}\n" for s in segments)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---- the read side (shared by the writer and the read-only view) ---------------------------
class _LogView:
    """Listing, reading and snapshots of one pipeline's log directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._topics: dict[bytes, str] = {}
        self._corrupt_skipped = 0
        self._corrupt_bytes = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r})"

    # listing
    def _segment_paths(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RawLogError(f"{self.directory}: cannot list: {exc.strerror}") from exc
        out = []
        for name in names:
            m = SEGMENT_RE.match(name)
            if m:
                out.append((int(m.group(1)), self.directory / name))
        out.sort()
        return out

    def _unsealed_info(self, path: Path, first_seq: int) -> SegmentInfo | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return _info_from_meta(path, first_seq, _scan(data, first_seq), len(data))

    def segments(self) -> list[SegmentInfo]:
        """Every segment, oldest first; sealed ones from their seal, others by a scan."""
        out = []
        for first, path in self._segment_paths():
            seal = _parse_seal(_seal_path(path))
            info = (_info_from_seal(path, first, seal) if seal
                    else self._unsealed_info(path, first))
            if info is not None:
                out.append(info)
        return out

    # reading
    def _prepare_read(self) -> None:
        """Hook: the writer pushes its buffer to the OS first."""

    def read(self, *, start_seq: int | None = None, end_seq: int | None = None,
             since: float | None = None, until: float | None = None,
             topic: str | None = None) -> Iterator[RawRecord]:
        """Records in seq order. ``start_seq``/``end_seq`` are inclusive; ``since <= received
        < until``; ``topic`` is an exact topic or an MQTT filter. A damaged record is logged,
        counted in ``stats`` and skipped: reading resumes at the next valid record."""
        self._prepare_read()
        return self._iter(start_seq, end_seq, since, until, topic_matcher(topic))

    def _iter(self, start_seq: int | None, end_seq: int | None, since: float | None,
              until: float | None, match: Callable[[str], bool] | None) -> Iterator[RawRecord]:
        paths = self._segment_paths()
        topics = self._topics
        for i, (first, path) in enumerate(paths):
            if end_seq is not None and first > end_seq:
                return
            last = i == len(paths) - 1
            if start_seq is not None and not last and paths[i + 1][0] <= start_seq:
                continue
            if since is not None or until is not None:
                seal = _parse_seal(_seal_path(path))
                if seal and seal.get("records") == 0:
                    continue
                if seal and seal.get("max_received") is not None and (
                        (since is not None and seal["max_received"] < since)
                        or (until is not None and seal["min_received"] >= until)):
                    continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # removed by retention while we were reading
                continue
            name = path.name
            if not _header_ok(data) and len(data) >= _FILE_HDR.size:
                log.warning("%s: bad segment header; reading its records anyway", path)
            for pos, end, seq, received, tlen in _walk(data, _FILE_HDR.size, first):
                if seq is None:
                    self._damaged(path, pos, end, is_tail=received, live=last)
                    continue
                if start_seq is not None and seq < start_seq:
                    continue
                if end_seq is not None and seq > end_seq:
                    return
                if since is not None and received < since:
                    continue
                if until is not None and received >= until:
                    continue
                t0 = pos + 30
                tb = data[t0:t0 + tlen]
                tname = topics.get(tb)
                if tname is None:
                    tname = tb.decode("utf-8", "replace")
                    if len(topics) > 4096:
                        topics.clear()
                    topics[tb] = tname
                if match is not None and not match(tname):
                    continue
                yield RawRecord(seq, received, tname, data[t0 + tlen:end], name)

    def _damaged(self, path: Path, pos: int, end: int, *, is_tail: bool, live: bool) -> None:
        if is_tail and live:
            # the newest segment: a record being written right now, or a tail torn by a crash
            # (the writer cuts it when it next opens the log)
            log.info("%s: incomplete tail at bytes %d-%d (being written, or torn by a crash)",
                     path, pos, end)
            return
        self._corrupt_skipped += 1
        self._corrupt_bytes += end - pos
        where = "at the end" if is_tail else "before the next valid record"
        log.warning("%s: corrupt record at bytes %d-%d (%d bytes, %s) skipped",
                    path, pos, end, end - pos, where)

    # versioned data
    def _prepare_snapshot(self, start_seq: int | None, end_seq: int | None) -> None:
        """Hook: the writer seals its open segment first."""

    def snapshot(self, *, start_seq: int | None = None,
                 end_seq: int | None = None) -> dict[str, Any]:
        """A manifest citing the sealed segments that hold seqs in ``[start_seq, end_seq]``."""
        self._prepare_snapshot(start_seq, end_seq)
        infos = self.segments()
        chosen = [s for s in infos if s.sealed and s.records > 0 and s.last_seq is not None
                  and (end_seq is None or s.first_seq <= end_seq)
                  and (start_seq is None or s.last_seq >= start_seq)]
        open_seg = next((s for s in infos if not s.sealed and s.records > 0), None)
        if not chosen:
            rng = f"{start_seq if start_seq is not None else 'start'}-" \
                  f"{end_seq if end_seq is not None else 'end'}"
            raise RawLogError(f"{self.directory}: no sealed segment holds records in seq "
                              f"range {rng}")
        segs = [{
            "file": s.name, "first_seq": s.first_seq, "last_seq": s.last_seq,
            "records": s.records, "bytes": s.bytes, "sha256": s.sha256,
            "first_received": s.first_received, "last_received": s.last_received,
        } for s in chosen]
        mins = [s.min_received for s in chosen if s.min_received is not None]
        maxs = [s.max_received for s in chosen if s.max_received is not None]
        now = time.time()
        return {
            "format": SNAPSHOT_FORMAT,
            "version": FORMAT_VERSION,
            "id": _snapshot_id(segs),
            "pipeline": self.directory.name,
            "directory": str(self.directory.resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "created_epoch": now,
            "range": {"start_seq": start_seq, "end_seq": end_seq},
            "first_seq": chosen[0].first_seq,
            "last_seq": chosen[-1].last_seq,
            "records": sum(s.records for s in chosen),
            "bytes": sum(s.bytes for s in chosen),
            "first_received": min(mins) if mins else None,
            "last_received": max(maxs) if maxs else None,
            "segments": segs,
            "open_segment_excluded": (
                {"file": open_seg.name, "first_seq": open_seg.first_seq,
                 "records": open_seg.records} if open_seg is not None
                and (end_seq is None or open_seg.first_seq <= end_seq) else None),
        }

    def _view_stats(self, infos: Sequence[SegmentInfo]) -> dict[str, Any]:
        oldest = next((s.first_seq for s in infos if s.records), None)
        return {
            "segments": len(infos),
            "sealed_segments": sum(1 for s in infos if s.sealed),
            "bytes_on_disk": sum(s.bytes for s in infos),
            "oldest_seq": oldest,
            "corrupt_records_skipped": self._corrupt_skipped,
            "corrupt_bytes_skipped": self._corrupt_bytes,
        }


class RawLogReader(_LogView):
    """A read-only view: safe while the daemon writes the same log; never modifies a file."""

    @property
    def stats(self) -> dict[str, Any]:
        infos = self.segments()
        d = self._view_stats(infos)
        last = next((s.last_seq for s in reversed(infos) if s.last_seq is not None), None)
        d["next_seq"] = (last + 1) if last is not None else (infos[-1].first_seq if infos else 0)
        d["records"] = sum(s.records for s in infos)
        return d


def open_reader(directory: str | Path) -> RawLogReader:
    """A read-only view of the log in ``directory`` (for the CLI while the daemon runs)."""
    d = Path(directory)
    if not d.is_dir():
        raise RawLogError(f"{d}: no raw-input log here")
    return RawLogReader(d)


# ---- the writer ----------------------------------------------------------------------------
class RawLog(_LogView):
    """The appending side of one pipeline's log (one writer per directory, enforced by a lock).

    Appends go to a memory buffer that is handed to the OS when it passes ``buffer_bytes``, on
    :meth:`flush`, and at the end of every :meth:`append_many` (one write() call); :meth:`sync`
    also fsyncs. With ``fsync_interval_s == 0`` every append is written and fsynced at once.
    Thread-safe: the daemon appends from the event loop and syncs from a worker thread.
    """

    def __init__(self, directory: str | Path, *, segment_bytes: int = 16 * 2**20,
                 budget_bytes: int | None = 2**30, max_age_s: float | None = 30 * 86400,
                 fsync_interval_s: float = 1.0, buffer_bytes: int = 64 * 1024) -> None:
        super().__init__(directory)
        if not isinstance(segment_bytes, int) or segment_bytes < 1024:
            raise RawLogError(f"segment_bytes must be an int >= 1024, not {segment_bytes!r}")
        if budget_bytes is not None and (not isinstance(budget_bytes, int)
                                         or budget_bytes < segment_bytes):
            raise RawLogError(f"budget_bytes ({budget_bytes!r}) must be an int >= "
                              f"segment_bytes ({segment_bytes}), or None for no limit")
        if max_age_s is not None and not max_age_s > 0:
            raise RawLogError(f"max_age_s must be > 0 or None, not {max_age_s!r}")
        if not fsync_interval_s >= 0:
            raise RawLogError(f"fsync_interval_s must be >= 0, not {fsync_interval_s!r}")
        if not isinstance(buffer_bytes, int) or buffer_bytes < 0:
            raise RawLogError(f"buffer_bytes must be an int >= 0, not {buffer_bytes!r}")
        self.segment_bytes = segment_bytes
        self.budget_bytes = budget_bytes
        self.max_age_s = max_age_s
        self.fsync_interval_s = float(fsync_interval_s)
        self.buffer_bytes = buffer_bytes
        self._sync_each = self.fsync_interval_s == 0
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._fd = -1
        self._lock_fd = -1
        self._topic_bytes: dict[str, bytes] = {}
        self._sealed: list[SegmentInfo] = []
        self._sealed_bytes = 0
        # rolled segments waiting for the sealer thread (fsync, sha256, seal file), in order
        self._pending: dict[Path, SegmentInfo] = {}
        self._seal_queue: queue.Queue[tuple | None] = queue.Queue()
        self._seal_done: queue.SimpleQueue[tuple[Path, SegmentInfo | None]] = \
            queue.SimpleQueue()
        self._sealer: threading.Thread | None = None
        self._seal_errors = 0
        # the open segment
        self._open_path: Path = self.directory
        self._open_first = 0
        self._open_written = 0
        self._meta = _Meta()
        # counters
        self._records_appended = 0
        self._bytes_appended = 0
        self._segments_removed = 0
        self._records_removed = 0
        self._bytes_removed = 0
        self._fsyncs = 0
        self._write_errors = 0
        self._records_lost = 0
        self._last_sync = time.monotonic()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RawLogError(f"{self.directory}: cannot create: {exc.strerror}") from exc
        self._take_lock()
        try:
            self.recovery = self._recover()
            self._enforce_retention_locked(time.time())
        except BaseException:
            self._release()
            raise

    # ---- opening ---------------------------------------------------------------------------
    def _take_lock(self) -> None:
        path = self.directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RawLogError(f"{path}: cannot open lock file: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise RawLogBusyError(f"{self.directory}: already open for writing (pid {holder}); "
                              "read it with open_reader()") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    def _recover(self) -> RecoveryReport:
        """Seal leftovers, cut a torn tail off the last segment, and open it for appending."""
        d = self.directory
        for name in os.listdir(d):
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(d / name)
        paths = self._segment_paths()
        seg_names = {p.name for _, p in paths}
        for name in os.listdir(d):  # seals whose segment is gone (crash during retention)
            if name.endswith(SEAL_SUFFIX) and name[:-len(SEAL_SUFFIX)] + ".log" not in seg_names:
                with contextlib.suppress(OSError):
                    os.unlink(d / name)
        if not paths:
            self._create_segment_locked(0)
            return RecoveryReport(None, 0, 0, "new log")
        cuts: list[tuple[str, int]] = []
        for first, path in paths[:-1]:
            seal = _parse_seal(_seal_path(path))
            if seal is None:  # its seal was pending when we stopped: finish it now
                cut, meta = self._cut_tail(path, first)
                if cut:
                    cuts.append((path.name, cut))
                info = self._seal_file(path, first, meta)
                log.info("%s: sealed a segment left unsealed", path)
            else:
                info = _info_from_seal(path, first, seal)
            self._add_sealed(info)
        first, path = paths[-1]
        seal = _parse_seal(_seal_path(path))
        if seal is not None:  # crashed after sealing, before the next segment existed
            info = _info_from_seal(path, first, seal)
            self._add_sealed(info)
            nxt = info.last_seq + 1 if info.last_seq is not None else first
            self._create_segment_locked(nxt)
            rep = RecoveryReport(None, 0, 0, "last segment was sealed; started a new one")
        else:
            rep = self._recover_open(path, first)
        if cuts:  # rare: a power cut tore a segment whose seal was still pending
            name, _ = cuts[0]
            total = sum(c for _, c in cuts) + rep.truncated_bytes
            more = ", ".join(f"{n}: {c} bytes" for n, c in cuts)
            rep = RecoveryReport(rep.segment or name, total, rep.records_kept,
                                 f"{rep.detail}; also cut {more}")
        return rep

    def _cut_tail(self, path: Path, first: int) -> tuple[int, _Meta]:
        """Truncate bytes after the last valid record of a rolled, unsealed segment."""
        data = path.read_bytes()
        meta = _scan(data, first)
        if meta.tail_start is None:
            return 0, meta
        cut = len(data) - meta.tail_start
        try:
            with open(path, "r+b") as fh:
                fh.truncate(meta.tail_start)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise RawLogError(f"{path}: cannot recover: {exc.strerror}") from exc
        log.warning("%s: cut %d bytes of a torn tail after seq %s (a power cut before its "
                    "seal was written)", path, cut, meta.last_seq)
        meta.tail_start = None
        return cut, meta

    def _recover_open(self, path: Path, first: int) -> RecoveryReport:
        data = path.read_bytes()
        meta = _scan(data, first)
        size = len(data)
        cut_to = size
        detail = ""
        if not meta.header_ok and meta.records == 0:
            cut_to = 0  # torn/garbled header and nothing valid behind it: start the file over
            detail = "segment header torn"
        elif meta.tail_start is not None:
            cut_to = meta.tail_start
            detail = "torn or corrupt tail"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise RawLogError(f"{path}: cannot open for appending: {exc.strerror}") from exc
        try:
            if cut_to < size:
                os.ftruncate(fd, cut_to)
            if cut_to == 0:
                os.write(fd, _FILE_HDR.pack(SEGMENT_MAGIC, FORMAT_VERSION, _FILE_HDR.size, 0,
                                            first, time.time()))
            elif not meta.header_ok:
                # records intact behind a damaged header: rewrite the header in place (its own
                # descriptor: pwrite on an O_APPEND descriptor appends on Linux)
                hfd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(hfd, _FILE_HDR.pack(SEGMENT_MAGIC, FORMAT_VERSION,
                                                  _FILE_HDR.size, 0, first, time.time()), 0)
                    os.fsync(hfd)
                finally:
                    os.close(hfd)
                log.warning("%s: rewrote a damaged segment header; its records are intact", path)
            if cut_to < size:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise RawLogError(f"{path}: cannot recover: {exc.strerror}") from exc
        self._fd = fd
        self._open_path = path
        self._open_first = first
        self._open_written = cut_to if cut_to else _FILE_HDR.size
        self._meta = meta
        meta.tail_start = None
        prev_last = next((s.last_seq for s in reversed(self._sealed)
                          if s.last_seq is not None), None)
        self._next_seq = max(first, (prev_last + 1) if prev_last is not None else 0,
                             (meta.last_seq + 1) if meta.last_seq is not None else 0)
        if cut_to < size:
            cut = size - cut_to
            log.warning("%s: cut %d bytes of %s after the last good record (seq %s); "
                        "%d records kept, appending continues at seq %d", path, cut, detail,
                        meta.last_seq, meta.records, self._next_seq)
            return RecoveryReport(path.name, cut, meta.records, detail)
        return RecoveryReport(None, 0, meta.records, "clean")

    def _add_sealed(self, info: SegmentInfo) -> None:
        self._sealed.append(info)
        self._sealed_bytes += info.bytes

    def _create_segment_locked(self, first_seq: int, *, durable: bool = True) -> None:
        """A new open segment. ``durable=False`` (a roll) skips the fsyncs: the sealer fsyncs
        the directory right after, and recovery copes with a lost or torn new segment; on
        ext4 those fsyncs would also flush the previous segment's data, on the hot path."""
        path = self.directory / _segment_name(first_seq)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise RawLogError(f"{path}: cannot create segment: {exc.strerror}") from exc
        try:
            os.write(fd, _FILE_HDR.pack(SEGMENT_MAGIC, FORMAT_VERSION, _FILE_HDR.size, 0,
                                        first_seq, time.time()))
            if durable:
                os.fsync(fd)
                _fsync_dir(self.directory)
        except OSError as exc:
            os.close(fd)
            raise RawLogError(f"{path}: cannot write segment header: {exc.strerror}") from exc
        self._fd = fd
        self._open_path = path
        self._open_first = first_seq
        self._open_written = _FILE_HDR.size
        self._meta = _Meta()
        self._next_seq = first_seq

    # ---- appending -------------------------------------------------------------------------
    def _closed(self) -> RawLogError:
        return RawLogError(f"{self.directory}: the raw log is closed")

    def _frame(self, seq: int, topic: str, payload: bytes,
               received: float) -> tuple[bytes, bytes, int]:
        """(header + body prefix, payload, record length), or RawLogError on bad input."""
        tb = self._topic_bytes.get(topic)
        if tb is None:
            try:
                tb = topic.encode("utf-8")
            except (AttributeError, UnicodeError) as exc:
                raise RawLogError(f"topic {topic!r} is not a valid UTF-8 string") from exc
            if len(tb) > MAX_TOPIC_BYTES:
                raise RawLogError(f"topic is {len(tb)} bytes > {MAX_TOPIC_BYTES}")
            if len(self._topic_bytes) > 4096:
                self._topic_bytes.clear()
            self._topic_bytes[topic] = tb
        try:
            plen = len(payload)
            prefix = _BODY.pack(seq, received, len(tb)) + tb
            crc = zlib.crc32(payload, zlib.crc32(prefix))
        except (TypeError, struct.error) as exc:
            raise RawLogError(f"cannot archive record: {exc} (payload must be bytes, "
                              "received a float)") from exc
        if plen > MAX_PAYLOAD_BYTES:
            raise RawLogError(f"payload is {plen} bytes > {MAX_PAYLOAD_BYTES}")
        blen = len(prefix) + plen
        return _REC_HDR.pack(_MAGIC_INT, blen, crc) + prefix, payload, blen + 12

    def _add_locked(self, seq: int, received: float, head: bytes, payload: bytes,
                    rec_len: int) -> None:
        meta = self._meta
        if meta.records and self._open_written + len(self._buf) + rec_len > self.segment_bytes:
            self._roll_locked()
            meta = self._meta
        self._next_seq = seq + 1
        meta.note(seq, received)  # first: a failed write below counts this record as lost
        self._records_appended += 1
        self._bytes_appended += rec_len
        if len(payload) >= _DIRECT_WRITE_BYTES:
            self._write_out_locked()
            self._write_locked(head, payload)
        else:
            buf = self._buf
            buf += head
            buf += payload

    def append(self, topic: str, payload: bytes, received: float) -> int:
        """Archive one message; returns its sequence number."""
        with self._lock:
            if self._fd < 0:
                raise self._closed()
            seq = self._next_seq
            head, payload, rec_len = self._frame(seq, topic, payload, received)
            self._add_locked(seq, received, head, payload, rec_len)
            if self._sync_each:
                self._write_out_locked()
                self._fsync_locked()
            elif len(self._buf) >= self.buffer_bytes:
                self._write_out_locked()
            return seq

    def append_many(self, items: Sequence[tuple[str, bytes, float]]) -> range:
        """Archive a burst with one write() call (unless it crosses a segment boundary); on
        return the records are in the OS (or fsynced with ``fsync_interval_s == 0``)."""
        with self._lock:
            if self._fd < 0:
                raise self._closed()
            first = self._next_seq
            seq = first
            framed = [(*self._frame(first + i, t, p, r), r) for i, (t, p, r) in
                      enumerate(items)]
            for head, payload, rec_len, received in framed:
                self._add_locked(seq, received, head, payload, rec_len)
                seq += 1
            self._write_out_locked()
            if self._sync_each and framed:
                self._fsync_locked()
            return range(first, seq)

    # ---- getting bytes to the disk ---------------------------------------------------------
    def _write_locked(self, *parts: bytes | bytearray) -> None:
        try:
            _write_all(self._fd, *parts)
        except OSError as exc:
            self._write_failed_locked(exc)
        self._open_written += sum(len(p) for p in parts)

    def _write_out_locked(self) -> None:
        if self._buf:
            buf = self._buf
            self._buf = bytearray()
            self._write_locked(buf)

    def _write_failed_locked(self, exc: OSError) -> None:
        """Cut what a failed write left behind so the segment stays well formed, and count
        the records that were lost (their seqs are not reused while this process runs)."""
        self._write_errors += 1
        self._buf = bytearray()
        path = self._open_path
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._open_written)
        try:
            data = path.read_bytes()[:self._open_written]
        except OSError:
            data = b""
        meta = _scan(data, self._open_first)
        lost = self._meta.records - meta.records
        self._records_lost += lost
        meta.tail_start = None
        self._meta = meta
        raise RawLogError(f"{path}: write failed ({exc.strerror or exc}); {lost} record(s) not "
                          "archived") from exc

    def _fsync_locked(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._write_errors += 1
            raise RawLogError(f"{self._open_path}: fsync failed: {exc.strerror}") from exc
        self._fsyncs += 1
        self._last_sync = time.monotonic()

    def flush(self) -> None:
        """Hand buffered records to the OS: they then survive a crash of this process."""
        with self._lock:
            if self._fd >= 0:
                self._write_out_locked()

    def sync(self) -> None:
        """flush() + fsync: records then survive a power cut. The fsync runs outside the lock
        (on a duplicate descriptor) so appends from other threads are not held up."""
        with self._lock:
            if self._fd < 0:
                return
            self._write_out_locked()
            fd = os.dup(self._fd)
            started = time.monotonic()
        try:
            os.fsync(fd)
        except OSError as exc:
            with self._lock:
                self._write_errors += 1
            raise RawLogError(f"{self._open_path}: fsync failed: {exc.strerror}") from exc
        finally:
            os.close(fd)
        with self._lock:
            self._fsyncs += 1
            self._last_sync = max(self._last_sync, started)

    def maybe_sync(self) -> None:
        """sync() when ``fsync_interval_s`` has passed since the last one; cheap otherwise."""
        if (self.fsync_interval_s > 0
                and time.monotonic() - self._last_sync >= self.fsync_interval_s):
            self.sync()

    def close(self) -> None:
        """Write, fsync, finish pending seals and close; the log can be reopened. Idempotent."""
        with self._lock:
            if self._lock_fd < 0:
                return
            try:
                if self._fd >= 0:
                    self._write_out_locked()
                    self._fsync_locked()
            finally:
                if self._fd >= 0:
                    os.close(self._fd)  # appends fail from here on
                    self._fd = -1
        if self._sealer is not None:
            self._seal_queue.put(None)
            self._sealer.join()
            self._sealer = None
        with self._lock:
            self._integrate_seals_locked()
            self._release()  # the writer lock last: nobody else writes before seals are done

    def __enter__(self) -> RawLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # ---- segments, sealing, retention ------------------------------------------------------
    def _seal_file(self, path: Path, first: int, meta: _Meta) -> SegmentInfo:
        """Hash a finished segment and write its seal atomically (tmp + rename + fsync)."""
        try:
            digest = _sha256_file(path)
            size = path.stat().st_size
            info = _info_from_meta(path, first, meta, size, sealed=True, sha256=digest)
            seal = _seal_path(path)
            tmp = seal.with_name(seal.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(_seal_doc(info), fh, indent=1)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, seal)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise RawLogError(f"{path}: cannot seal: {exc.strerror}") from exc
        return info

    def _roll_locked(self) -> None:
        """Start a new segment. The finished one goes to the sealer thread (fsync, sha256,
        seal file) so that the appending thread, the daemon's event loop, never waits for a
        16 MiB hash. At most one seal is pending: rolling again waits for the previous one
        (only at append rates beyond what the hash keeps up with, ~400 MB/s)."""
        self._write_out_locked()
        if self._seal_queue.unfinished_tasks:
            self._seal_queue.join()  # safe under our lock: the sealer never takes it
        self._integrate_seals_locked()
        path, first, meta = self._open_path, self._open_first, self._meta
        self._pending[path] = _info_from_meta(path, first, meta, self._open_written)
        self._seal_queue.put((path, first, meta, self._fd))
        self._fd = -1
        if self._sealer is None:
            self._sealer = threading.Thread(target=self._sealer_main, daemon=True,
                                            name=f"rawlog-sealer-{self.directory.name}")
            self._sealer.start()
        self._create_segment_locked(self._next_seq, durable=self._sync_each)
        self._enforce_retention_locked(time.time())  # the budget counts pending segments

    def _sealer_main(self) -> None:
        """The sealer thread: touches files only, never the writer's state or lock."""
        while True:
            job = self._seal_queue.get()
            try:
                if job is None:
                    return
                path, first, meta, fd = job
                info: SegmentInfo | None = None
                try:
                    os.fsync(fd)
                    info = self._seal_file(path, first, meta)
                except (OSError, RawLogError) as exc:
                    log.error("%s: cannot seal (it is sealed at the next open): %s", path, exc)
                finally:
                    os.close(fd)
                self._seal_done.put((path, info))
            except Exception:  # never let the thread die: later segments still need seals
                log.exception("%s: sealer failed", self.directory)
            finally:
                self._seal_queue.task_done()

    def _integrate_seals_locked(self) -> None:
        """Move finished seals from pending to sealed, then apply retention."""
        changed = False
        while not self._seal_done.empty():
            path, info = self._seal_done.get()
            if info is None:
                self._seal_errors += 1  # stays pending: shown unsealed, never removed
                continue
            self._pending.pop(path, None)
            self._add_sealed(info)
            changed = True
        if changed:
            self._sealed.sort(key=lambda i: i.first_seq)
            self._enforce_retention_locked(time.time())

    def wait_sealed(self) -> None:
        """Block until every rolled segment is sealed (snapshot() and close() do this)."""
        self._seal_queue.join()
        with self._lock:
            self._integrate_seals_locked()

    def _enforce_retention_locked(self, now: float) -> tuple[int, int, int]:
        """Drop the oldest sealed segments while the log could outgrow its budget (the open
        segment may still grow to ``segment_bytes``) or their newest record is too old."""
        removed = (0, 0, 0)
        while self._sealed:
            oldest = self._sealed[0]
            pending = sum(i.bytes for i in self._pending.values())
            over = (self.budget_bytes is not None
                    and self._sealed_bytes + pending + self.segment_bytes > self.budget_bytes)
            old = self.max_age_s is not None and (
                oldest.max_received is None or oldest.max_received < now - self.max_age_s)
            if not (over or old):
                break
            try:
                oldest.path.unlink(missing_ok=True)
                _seal_path(oldest.path).unlink(missing_ok=True)
            except OSError as exc:
                log.error("%s: retention cannot remove: %s", oldest.path, exc.strerror)
                break
            self._sealed.pop(0)
            self._sealed_bytes -= oldest.bytes
            self._segments_removed += 1
            self._records_removed += oldest.records
            self._bytes_removed += oldest.bytes
            removed = (removed[0] + 1, removed[1] + oldest.records, removed[2] + oldest.bytes)
            log.info("%s: removed by retention (%s; seqs %s-%s, %d records, %d bytes)",
                     oldest.path.name, "over budget" if over else "too old",
                     oldest.first_seq, oldest.last_seq, oldest.records, oldest.bytes)
        # no directory fsync: an unlink lost in a power cut is redone at the next open
        return removed

    def enforce_retention(self) -> dict[str, int]:
        """Apply the byte budget and the age limit now (rolls do it anyway; call it from time
        to time so an idle log still forgets old data)."""
        with self._lock:
            if self._fd < 0:
                raise self._closed()
            self._integrate_seals_locked()
            segs, recs, nbytes = self._enforce_retention_locked(time.time())
        return {"segments": segs, "records": recs, "bytes": nbytes}

    def roll(self) -> None:
        """Seal the open segment now (if it holds records) and start a new one; returns when
        the seal is written."""
        with self._lock:
            if self._fd < 0:
                raise self._closed()
            if self._meta.records:
                self._roll_locked()
        self.wait_sealed()

    def _open_info_locked(self) -> SegmentInfo:
        return _info_from_meta(self._open_path, self._open_first, self._meta,
                               self._open_written + len(self._buf))

    def segments(self) -> list[SegmentInfo]:
        with self._lock:
            if self._fd < 0:
                return super().segments()
            self._write_out_locked()
            return self._infos_locked()

    def _infos_locked(self) -> list[SegmentInfo]:
        self._integrate_seals_locked()
        rolled = sorted([*self._sealed, *self._pending.values()], key=lambda i: i.first_seq)
        return [*rolled, self._open_info_locked()]

    def _prepare_read(self) -> None:
        self.flush()

    def _prepare_snapshot(self, start_seq: int | None, end_seq: int | None) -> None:
        with self._lock:
            if self._fd < 0:
                return
            if self._meta.records and (end_seq is None or self._open_first <= end_seq):
                self._roll_locked()
        self.wait_sealed()

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            infos = self._infos_locked() if self._fd >= 0 else []
            d = self._view_stats(infos) if infos else self._view_stats(super().segments())
            d.update({
                "next_seq": self._next_seq,
                "records_appended": self._records_appended,
                "bytes_appended": self._bytes_appended,
                "buffered_bytes": len(self._buf),
                "segments_removed": self._segments_removed,
                "records_removed": self._records_removed,
                "bytes_removed": self._bytes_removed,
                "fsyncs": self._fsyncs,
                "pending_seals": len(self._pending),
                "seal_errors": self._seal_errors,
                "last_sync_age_s": round(time.monotonic() - self._last_sync, 3),
                "write_errors": self._write_errors,
                "records_lost": self._records_lost,
                "recovered_truncated_bytes": self.recovery.truncated_bytes,
            })
            return d


# ---- versioned data ------------------------------------------------------------------------
def _manifest_error(key: str, problem: str) -> RawLogError:
    return RawLogError(f"snapshot manifest: {key}: {problem}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a snapshot manifest file (``edgeml log verify``, ``edgeml replay``)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RawLogError(f"{path}: cannot read the snapshot: {exc.strerror}") from exc
    except ValueError as exc:
        raise RawLogError(f"{path}: not valid JSON: {exc}") from exc
    try:
        check_manifest(manifest)
    except RawLogError as exc:
        raise RawLogError(f"{path}: {exc}") from None
    return manifest


def check_manifest(manifest: Any) -> list[dict[str, Any]]:
    """Validate a snapshot manifest's shape; returns its segment entries."""
    if not isinstance(manifest, dict):
        raise _manifest_error("(top level)", "must be a JSON object")
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise _manifest_error("format", f"must be {SNAPSHOT_FORMAT!r}, "
                              f"not {manifest.get('format')!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise _manifest_error("version", f"unsupported {manifest.get('version')!r} "
                              f"(this edgeml reads {FORMAT_VERSION})")
    segs = manifest.get("segments")
    if not isinstance(segs, list) or not segs:
        raise _manifest_error("segments", "must be a non-empty list")
    for i, s in enumerate(segs):
        if not isinstance(s, dict):
            raise _manifest_error(f"segments[{i}]", "must be an object")
        if not isinstance(s.get("file"), str) or not SEGMENT_RE.match(s["file"]):
            raise _manifest_error(f"segments[{i}].file", f"not a segment file name: "
                                  f"{s.get('file')!r}")
        sha = s.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise _manifest_error(f"segments[{i}].sha256", "must be 64 lowercase hex digits")
        if not isinstance(s.get("bytes"), int):
            raise _manifest_error(f"segments[{i}].bytes", "must be an integer")
    return segs


def verify_snapshot(directory: str | Path, manifest: Mapping[str, Any]) -> VerifyReport:
    """Check that every segment the manifest cites is in ``directory`` with the same bytes."""
    segs = check_manifest(manifest)
    d = Path(directory)
    missing: list[str] = []
    changed: list[str] = []
    problems: list[str] = []
    if manifest.get("id") != _snapshot_id(segs):
        problems.append("manifest id does not match its segment list (the manifest was edited)")
    for s in segs:
        path = d / s["file"]
        try:
            size = path.stat().st_size
            digest = _sha256_file(path)
        except FileNotFoundError:
            missing.append(s["file"])
            problems.append(f"{s['file']}: missing (removed by retention, or the wrong archive)")
            continue
        except OSError as exc:
            missing.append(s["file"])
            problems.append(f"{s['file']}: unreadable: {exc.strerror}")
            continue
        if digest != s["sha256"] or size != s["bytes"]:
            changed.append(s["file"])
            problems.append(f"{s['file']}: changed (sha256 {digest[:16]}..., {size} bytes; "
                            f"snapshot has {s['sha256'][:16]}..., {s['bytes']} bytes)")
    return VerifyReport(ok=not problems, checked=len(segs), missing=tuple(missing),
                        changed=tuple(changed), problems=tuple(problems))
