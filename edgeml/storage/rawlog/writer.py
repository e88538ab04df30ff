"""Writing the raw log: :class:`RawLog` appends (buffered, one write() per burst), rolls and
seals segments (on a sealer thread), applies retention, fsyncs, and recovers at open (seals
leftovers, cuts a torn tail). One writer per directory, enforced by a :class:`DirLock`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import RawLogBusyError, RawLogError
from edgeml.storage.fs import DirLock, atomic_write, fsync_dir
from edgeml.storage.rawlog.format import (
    _BODY,
    _FILE_HDR,
    _MAGIC_INT,
    _REC_HDR,
    FORMAT_VERSION,
    LOCK_NAME,
    MAX_PAYLOAD_BYTES,
    MAX_TOPIC_BYTES,
    SEAL_SUFFIX,
    SEGMENT_MAGIC,
    SegmentInfo,
    _info_from_meta,
    _info_from_seal,
    _Meta,
    _parse_seal,
    _scan,
    _seal_doc,
    _seal_path,
    _segment_name,
    _sha256_file,
)
from edgeml.storage.rawlog.reader import _LogView

log = logging.getLogger("edgeml.storage.rawlog")

_DIRECT_WRITE_BYTES = 256 * 1024  # larger payloads skip the buffer (no copy: writev)
#: the sequence high-water mark: seqs are reserved in blocks of this many, and the
#: reservation is on disk (fsynced) before any seq of the block is handed out, so a lost tail
#: (power cut, truncated segment) never brings a seq back that an answer already carried
SEQ_FILE = "seq.json"
SEQ_RESERVE = 4096


@dataclass(frozen=True)
class RecoveryReport:
    """What opening the log had to cut from the tail of its last segment (if anything)."""

    segment: str | None
    truncated_bytes: int
    records_kept: int
    detail: str = ""


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
                 fsync_interval_s: float = 1.0, buffer_bytes: int = 64 * 1024,
                 seq_reserve: int = SEQ_RESERVE,
                 clock: Any = time.time, monotonic: Any = time.monotonic) -> None:
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
        self.seq_reserve = int(seq_reserve)
        self._reserved = 0  # seqs below this may have been handed out (seq.json)
        self._clock = clock
        self._mono = monotonic
        self._age_base: tuple[float, float] | None = None  # (wall, monotonic) at open
        self.retention_refusals = 0
        self._sync_each = self.fsync_interval_s == 0
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._fd = -1
        self._dirlock: DirLock | None = None
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
            self._restore_seq_mark()
            self._age_base = (self._clock(), self._mono())
            self._enforce_retention_locked(self._clock())
        except BaseException:
            self._release()
            raise

    # ---- opening ---------------------------------------------------------------------------
    def _take_lock(self) -> None:
        try:
            self._dirlock = DirLock(self.directory, LOCK_NAME)
        except BlockingIOError as exc:
            holder = getattr(exc, "holder", "?")
            raise RawLogBusyError(f"{self.directory}: already open for writing (pid {holder}); "
                                  "read it with open_reader()") from exc
        except OSError as exc:
            raise RawLogError(f"{self.directory / LOCK_NAME}: cannot open lock file: "
                              f"{exc.strerror}") from exc

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dirlock is not None:
            self._dirlock.release()  # closing the lock file releases the lock
            self._dirlock = None

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

    # ---- the sequence high-water mark ----------------------------------------
    def _seq_path(self) -> Path:
        return self.directory / SEQ_FILE

    def _restore_seq_mark(self) -> None:
        if self.seq_reserve <= 0:
            return
        try:
            doc = json.loads(self._seq_path().read_text(encoding="utf-8"))
            mark = int(doc["reserved"])
        except FileNotFoundError:
            mark = 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # unreadable: never reuse a seq: jump a whole block past what the log holds
            log.error("%s: unreadable (%s); sequence numbers continue one reserve block "
                      "further", self._seq_path(), exc)
            mark = self._next_seq + self.seq_reserve
        if mark > self._next_seq:
            log.warning("%s: sequence numbers %d..%d may have been handed out before a lost "
                        "tail or an unclean stop; continuing at %d (never reused)",
                        self.directory, self._next_seq, mark - 1, mark)
            self._next_seq = mark
        self._reserved = self._next_seq
        self._reserve_locked(self._next_seq)

    def _reserve_locked(self, upto: int) -> None:
        """Make every seq below ``upto`` (and a block more) safe to hand out."""
        if self.seq_reserve <= 0 or upto < self._reserved:
            return
        mark = upto + self.seq_reserve
        try:
            atomic_write(self._seq_path(), json.dumps({"reserved": mark}).encode())
        except OSError as exc:
            raise RawLogError(f"{self._seq_path()}: cannot persist the sequence mark: "
                              f"{exc.strerror}") from exc
        self._reserved = mark

    @property
    def seq_reserved(self) -> int:
        """Seqs below this may have been handed out (published in the status)."""
        return self._reserved

    def advance_seq(self, seq: int) -> bool:
        """Continue at ``seq`` at least (a restored data dir: the fleet saw higher seqs)."""
        with self._lock:
            if seq <= self._next_seq:
                return False
            self._write_out_locked()
            self._next_seq = seq
            self._reserve_locked(seq)
            return True

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
                fsync_dir(self.directory)
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
        if seq >= self._reserved:
            self._reserve_locked(seq + 1)
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
                self._sync_segment_locked()
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
            if first + len(items) > self._reserved:
                self._reserve_locked(first + len(items))
            framed = [(*self._frame(first + i, t, p, r), r) for i, (t, p, r) in
                      enumerate(items)]
            for head, payload, rec_len, received in framed:
                self._add_locked(seq, received, head, payload, rec_len)
                seq += 1
            self._write_out_locked()
            if self._sync_each and framed:
                self._sync_segment_locked()
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

    def _sync_segment_locked(self) -> None:
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
            if self._dirlock is None:
                return
            try:
                if self._fd >= 0:
                    self._write_out_locked()
                    self._sync_segment_locked()
                    if self.seq_reserve > 0:  # a clean stop: continue exactly here
                        with contextlib.suppress(OSError):
                            atomic_write(self._seq_path(),
                                         json.dumps({"reserved": self._next_seq}).encode())
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
        """Hash a finished segment and write its seal atomically (:func:`atomic_write`)."""
        try:
            digest = _sha256_file(path)
            size = path.stat().st_size
            info = _info_from_meta(path, first, meta, size, sealed=True, sha256=digest)
            doc = json.dumps(_seal_doc(info), indent=1) + "\n"
            # temp file (".<seal>.<random>.tmp": recovery removes leftovers), fsync, rename,
            # fsync the directory; 0644 like the segments, for readers running as other users
            atomic_write(_seal_path(path), doc.encode("utf-8"), mode=0o644)
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
        self._enforce_retention_locked(self._clock())  # the budget counts pending segments

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
            self._enforce_retention_locked(self._clock())

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
            old = self.max_age_s is not None and self._too_old_locked(oldest, now)
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

    # ---- clock-safe age retention ----------------------------------------------
    #: wall time and monotonic time may drift apart by this much before it counts as a step
    CLOCK_STEP_S = 120.0
    #: records received before this wall time (2024-01-01) were stamped by an unset clock
    TRUSTED_WALL = 1_704_067_200.0

    def _refuse_age(self, why: str) -> bool:
        self.retention_refusals += 1
        if why != getattr(self, "_last_refusal", None):
            log.warning("%s: age-based retention refused: %s (the byte budget still applies)",
                        self.directory, why)
            self._last_refusal = why
        return False

    def _too_old_locked(self, oldest: SegmentInfo, now: float) -> bool:
        """Whether the oldest sealed segment is past ``max_age_s``, judged only when the wall
        clock can be believed: it agrees with monotonic time since the log was opened, the
        segment was stamped by a set clock, and the segments' times follow their order.
        A clock step (1970 -> 2026 at NTP sync, or back) never deletes anything."""
        assert self.max_age_s is not None
        if oldest.max_received is None:
            return True  # an empty segment: nothing to lose
        if self._age_base is not None:
            wall0, mono0 = self._age_base
            expected = wall0 + (self._mono() - mono0)
            if abs(now - expected) > self.CLOCK_STEP_S:
                self._age_base = (now, self._mono())  # judge from the new clock from now on
                return self._refuse_age(
                    f"the wall clock stepped by {now - expected:+.0f} s (it says {now:.0f}, "
                    f"monotonic time since the log was opened says {expected:.0f})")
        if oldest.max_received < self.TRUSTED_WALL:
            return self._refuse_age(
                f"{oldest.path.name} (seqs {oldest.first_seq}-{oldest.last_seq}) was stamped "
                f"{oldest.max_received:.0f}, before the clock was set; kept until the budget "
                "needs the space")
        later = [i.max_received for i in self._sealed[1:] if i.max_received is not None]
        if self._meta.records and self._meta.max_received is not None:
            later.append(self._meta.max_received)
        if later and min(later) < oldest.max_received - self.CLOCK_STEP_S:
            return self._refuse_age(
                f"segment times disagree with their order: {oldest.path.name} ends at "
                f"{oldest.max_received:.0f}, a later segment at {min(later):.0f}")
        if oldest.max_received > now + self.CLOCK_STEP_S:
            return self._refuse_age(
                f"{oldest.path.name} ends at {oldest.max_received:.0f}, after now ({now:.0f})")
        return oldest.max_received < now - self.max_age_s

    def enforce_retention(self) -> dict[str, int]:
        """Apply the byte budget and the age limit now (rolls do it anyway; call it from time
        to time so an idle log still forgets old data)."""
        with self._lock:
            if self._fd < 0:
                raise self._closed()
            self._integrate_seals_locked()
            segs, recs, nbytes = self._enforce_retention_locked(self._clock())
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
                "retention_refusals": self.retention_refusals,
                "seq_reserved": self._reserved,
                "recovered_truncated_bytes": self.recovery.truncated_bytes,
            })
            return d

