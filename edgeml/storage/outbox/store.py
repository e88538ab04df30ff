"""The durable outbox store: versioned outputs wait here until the upstream broker has them.

SQLite in WAL mode (stdlib ``sqlite3``): a batch of records is one atomic transaction, a
process crash never loses a committed record nor leaves half a batch, everything lives in one
directory, and there is no dependency to install. Records are grouped in named *streams*, each
with a priority (lower is sent first) and a policy for a full disk budget. Every record carries
a stable unique id, so a replay after a crash does not duplicate locally (within the newest
``DEDUP_WINDOW`` records of a stream) and upstream can drop the duplicates that at-least-once
delivery makes on the wire.

Storage is in *chunks*: one row holds the records one ``put_many`` wrote to one stream (at
most ``chunk_max_records`` / ``chunk_max_bytes`` of them), each already encoded as the map the
uplink sends (``record_id`` first). SQLite's cost is per row, so a flush of 800 records costs
about ten inserts instead of 800, and the uplink splices whole chunks into a message without
touching a record. Counts (backlog, drops) stay in records; eviction and acknowledgement work
on whole chunks.

Thread-safety: one SQLite connection (``check_same_thread=False``) behind one lock; every
public method may be called from any thread, and blocks while SQLite works. From asyncio, call
them in an executor (the daemon's writer thread puts, the :class:`~edgeml.core.uplink.Uplink` reads
and acks from its own executor thread). ``pending()`` and ``has_unreported_drops`` read
in-memory figures only and are cheap enough for the event loop.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError, OutboxError
from edgeml.storage.fs import DirLock
from edgeml.storage.outbox.budget import DEFAULT_STREAMS, StreamPolicy, _Counter, _Evictor
from edgeml.storage.outbox.migration import ensure_schema
from edgeml.storage.outbox.records import (
    ROW_OVERHEAD,
    OutboxChunk,
    _ids_of,
    _NewChunk,
    chunk_id,
    pack_record,
    pack_records,
)

log = logging.getLogger("edgeml.storage.outbox")
_STR = frozenset({str})

DB_NAME = "outbox.db"
LOCK_NAME = "outbox.lock"
# A chunk is at most this many records / payload bytes (the uplink lowers both to its batch
# limits, so one chunk always fits one message). ~100 records make the per-row cost negligible
# while keeping eviction and message packing fine-grained.
CHUNK_MAX_RECORDS = 100
CHUNK_MAX_BYTES = 64 * 1024
# Local deduplication by record id covers the newest this-many records of each stream: what
# the daemon re-scores after a crash (everything after the last committed high-water mark) is
# far fewer; a record re-stored further back is stored again and upstream drops it by id.
DEDUP_WINDOW = 4096
# Giving free pages back when the outbox drains happens at most this often (_give_back_space).
DRAINED_VACUUM_INTERVAL_S = 5.0

# ``(stream, ids, records, parts)``: a run of one stream's records for put_groups; ``parts``
# are the records already packed (pack_record's bytes) or None, ``records`` then optional.
Group = tuple[str, Sequence[str], Sequence[Mapping[str, Any]] | None, Sequence[bytes] | None]


@dataclass(frozen=True)
class PutResult:
    """What one ``put_many`` did. ``evicted`` counts older records removed to make room."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    evicted: int = 0


def outbox_paths(path: Path | str) -> tuple[Path, Path]:
    """``(directory, database file)`` of an outbox given as its directory or a ``.db`` path."""
    path = Path(path)
    if path.suffix == ".db":
        return path.parent, path
    return path, path / DB_NAME


def quick_check(db: sqlite3.Connection) -> list[str]:
    """SQLite's ``PRAGMA quick_check`` (page structure, record format, NOT NULL; not the
    index contents, which ``integrity_check`` also compares at a far higher cost): the
    problems it lists, empty when the file is sound. A file too damaged to be checked is one
    problem (the error)."""
    problems: list[str] = []
    try:
        for (row,) in db.execute("PRAGMA quick_check"):
            problems.append(str(row))
    except sqlite3.DatabaseError as exc:  # what it listed so far, then why it stopped
        problems.append(f"cannot check further: {exc}")
    return [] if problems == ["ok"] else problems


class Outbox:
    """``Outbox(data_dir / "outbox", budget_bytes=...)``: records wait here until acked.

    ``path`` is the outbox directory (created; the database is ``path/outbox.db``) or a path
    ending in ``.db``. Nothing is written outside that directory (SQLite's temp store is kept
    in memory). ``fsync_interval_s``: 0 fsyncs every commit (``synchronous=FULL``); otherwise
    commits are durable against a process crash at once and against power loss within about
    that interval (``synchronous=NORMAL`` plus a WAL checkpoint at most that often).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        budget_bytes: int = 256 * 2**20,
        streams: Mapping[str, StreamPolicy] | None = None,
        fsync_interval_s: float = 1.0,
        chunk_max_records: int = CHUNK_MAX_RECORDS,
        chunk_max_bytes: int = CHUNK_MAX_BYTES,
    ) -> None:
        self.dir, self.db_path = outbox_paths(path)
        if not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ConfigError(f"must be a positive integer, not {budget_bytes!r}",
                              key="outbox.budget_bytes")
        if fsync_interval_s < 0:
            raise ConfigError(f"must be >= 0, not {fsync_interval_s!r}",
                              key="outbox.fsync_interval_s")
        self.budget_bytes = budget_bytes
        self.fsync_interval_s = float(fsync_interval_s)
        self.chunk_max_records, self.chunk_max_bytes = 1 << 30, 1 << 62
        self.limit_chunks(chunk_max_records, chunk_max_bytes)
        self.streams: dict[str, StreamPolicy] = dict(streams if streams is not None
                                                     else DEFAULT_STREAMS)
        if not self.streams:
            raise ConfigError("at least one stream is needed", key="outbox.streams")
        for key, pol in self.streams.items():
            if key != pol.name:
                raise ConfigError(f"key {key!r} differs from the policy's name {pol.name!r}",
                                  key="outbox.streams")
        self.by_priority: tuple[str, ...] = tuple(
            sorted(self.streams, key=lambda s: (self.streams[s].priority, s)))
        self._lock = threading.Lock()
        self.unencodable = 0  # records refused because they cannot be encoded (counted)
        self.last_unencodable: str | None = None
        self._closed = False
        self._count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._oldest: dict[str, float | None] = {}
        self._lease: dict[str, int] = {}
        self._lease_bytes: dict[str, int] = {}
        self._counters: dict[str, _Counter] = {}
        self._marks: dict[str, int] = {}
        # the dedup window: record id -> chunk seq, and per stream its newest chunks' ids
        self._recent: dict[str, int] = {}
        self._recent_chunks: dict[str, dict[int, list[str]]] = {}
        self._recent_n: dict[str, int] = {}
        self._recent_loaded = False
        self._used = 0
        self._last_sync = time.monotonic()
        self._acks_since_vacuum = 0
        self._drained_vacuum_at = -DRAINED_VACUUM_INTERVAL_S  # monotonic
        self._file_lock: DirLock | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create the outbox directory {self.dir}: {exc}") from exc
        self._take_file_lock()
        try:
            self._db = self._open()
            self._load_state()
        except sqlite3.Error as exc:
            self._release_file_lock()
            raise OutboxError(f"cannot open the outbox {self.db_path}: {exc}") from exc
        except BaseException:
            self._release_file_lock()
            raise

    # ---- opening ----------------------------------------------------------------------------
    def _take_file_lock(self) -> None:
        try:
            self._file_lock = DirLock(self.dir, LOCK_NAME, record_pid=False)
        except BlockingIOError as exc:
            raise OutboxError(f"the outbox {self.dir} is in use by another process") from exc
        except OSError as exc:
            raise OutboxError(f"cannot open the outbox lock {self.dir / LOCK_NAME}: "
                              f"{exc.strerror or exc}") from exc

    def _release_file_lock(self) -> None:
        if self._file_lock is not None:
            self._file_lock.release()  # closing the lock file releases the lock
            self._file_lock = None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False,
                             timeout=5.0)
        try:
            new = db.execute("PRAGMA page_count").fetchone()[0] == 0
            if new:  # must precede the first table; lets acks give pages back to the disk
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"cannot put {self.db_path} in WAL mode (got {mode})")
            db.execute("PRAGMA synchronous=" + ("FULL" if self.fsync_interval_s == 0
                                                else "NORMAL"))
            db.execute("PRAGMA temp_store=MEMORY")  # no temp files outside the outbox dir
            # Debian/Ubuntu build SQLite with SECURE_DELETE: every ack would overwrite the
            # freed overflow pages of its chunks with zeros (as many bytes written again as
            # were acked). FAST still zeroes deleted cells on the pages a delete writes anyway.
            db.execute("PRAGMA secure_delete=FAST")
            page = db.execute("PRAGMA page_size").fetchone()[0]
            # Keep the WAL small next to a small budget: checkpoint every 1/8 of the budget
            # (between 64 and 1000 pages) and truncate the WAL file back to that size.
            pages = max(64, min(1000, self.budget_bytes // page // 8))
            db.execute(f"PRAGMA wal_autocheckpoint={pages}")
            db.execute(f"PRAGMA journal_size_limit={pages * page}")
            ensure_schema(db, self.db_path)
        except BaseException:
            db.close()
            raise
        return db


    def limit_chunks(self, max_records: int, max_bytes: int) -> None:
        """Chunks written from now on hold at most this many records and payload bytes (only
        ever lowered: the uplink calls it with its batch limits so a chunk fits a message)."""
        if not isinstance(max_records, int) or max_records < 1:
            raise ConfigError(f"must be an integer >= 1, not {max_records!r}",
                              key="outbox.chunk_max_records")
        if not isinstance(max_bytes, (int, float)) or max_bytes <= 0:
            raise ConfigError(f"must be a positive number, not {max_bytes!r}",
                              key="outbox.chunk_max_bytes")
        self.chunk_max_records = min(self.chunk_max_records, max_records)
        self.chunk_max_bytes = min(self.chunk_max_bytes, int(max_bytes))

    def _load_state(self) -> None:
        """Rebuild the in-memory figures from the database (at open and after a rollback)."""
        db = self._db
        self._count = dict.fromkeys(self.streams, 0)
        self._bytes = dict.fromkeys(self.streams, 0)
        self._oldest = dict.fromkeys(self.streams, None)
        self._lease, self._lease_bytes = {}, {}
        self._recent_loaded = False  # rebuilt from the rows at the next put
        for stream, n, size in db.execute(
                "SELECT stream, SUM(count), SUM(size) FROM chunks GROUP BY stream"):
            if stream not in self.streams:
                # A stream removed from the config keeps its records until they are sent.
                log.warning("outbox holds %d records of unconfigured stream %r", n, stream)
                self.streams[stream] = StreamPolicy(stream, 99, "drop_oldest")
                self.by_priority = (*self.by_priority, stream)
            self._count[stream] = n or 0
            self._bytes[stream] = size or 0
        for stream in self._count:
            self._oldest[stream] = self._query_oldest(stream)
        self._counters = {s: _Counter() for s in self.streams}
        for stream, d, r, rd, rr in db.execute(
                "SELECT stream, dropped, refused, reported_dropped, reported_refused "
                "FROM counters"):
            self._counters[stream] = _Counter(d, r, rd, rr)
        self._used = sum(self._bytes.values())
        self._marks = dict(db.execute("SELECT name, value FROM marks").fetchall())

    def _query_oldest(self, stream: str) -> float | None:
        row = self._db.execute("SELECT created FROM chunks WHERE stream=? ORDER BY seq LIMIT 1",
                               (stream,)).fetchone()
        return row[0] if row else None

    # ---- the dedup window -------------------------------------------------------------------
    def _load_recent(self) -> None:
        """The ids of each stream's newest ``DEDUP_WINDOW`` stored records (at the first put
        after opening: on the writer's thread, not in the way of the daemon's start)."""
        self._recent, self._recent_chunks = {}, {}
        self._recent_n = {}
        for stream in self.streams:
            newest: list[tuple[int, list[str]]] = []
            n = 0
            cur = self._db.execute("SELECT seq, payload FROM chunks WHERE stream=? "
                                   "ORDER BY seq DESC", (stream,))
            for seq, payload in cur:
                ids = _ids_of(payload)
                newest.append((seq, ids))
                n += len(ids)
                if n >= DEDUP_WINDOW:
                    break
            cur.close()
            for seq, ids in reversed(newest):
                self._remember(stream, seq, ids)
        self._recent_loaded = True

    def _remember(self, stream: str, seq: int, ids: list[str]) -> None:
        chunks = self._recent_chunks.setdefault(stream, {})
        chunks[seq] = ids
        self._recent.update(dict.fromkeys(ids, seq))
        n = self._recent_n.get(stream, 0) + len(ids)
        while len(chunks) > 1:  # keep at least the newest DEDUP_WINDOW records
            oldest = next(iter(chunks))
            if n - len(chunks[oldest]) < DEDUP_WINDOW:
                break
            n -= len(chunks[oldest])
            self._drop_ids(chunks.pop(oldest), oldest)
        self._recent_n[stream] = n

    def _forget(self, stream: str, seq: int) -> None:
        """A chunk left the outbox (acked, evicted): its ids may be stored again."""
        chunks = self._recent_chunks.get(stream)
        ids = chunks.pop(seq, None) if chunks else None
        if ids is not None:
            self._recent_n[stream] -= len(ids)
            self._drop_ids(ids, seq)

    def _drop_ids(self, ids: list[str], seq: int) -> None:
        recent = self._recent
        if list(map(recent.get, ids)).count(seq) == len(ids):  # the usual case, in C
            collections.deque(map(recent.pop, ids, itertools.repeat(None)), maxlen=0)
            return
        for rid in ids:  # some id was stored again by a later chunk: that one stays
            if recent.get(rid) == seq:
                del recent[rid]

    # ---- writing ----------------------------------------------------------------------------
    def put(self, stream: str, record_id: str, record: Mapping[str, Any]) -> bool:
        """Store one record; True if it is in the outbox now (stored or already there)."""
        return self.put_many([(stream, record_id, record)]).refused == 0

    def put_many(self, items: Sequence[tuple[str, str, Mapping[str, Any]]], *,
                 marks: Mapping[str, int] | None = None) -> PutResult:
        """Store ``(stream, record_id, record)`` items in ONE transaction (all or nothing).

        The records of each stream become one chunk (several past ``chunk_max_records`` /
        ``chunk_max_bytes``), in item order. A record id already among the newest
        ``DEDUP_WINDOW`` records of the outbox, or twice in ``items``, is ignored (a replay
        after a crash does not duplicate). When the budget is full the stream's policy applies
        (see :class:`StreamPolicy`); every evicted or refused record is counted per stream in
        the same transaction, so the counts survive restarts and are exact.

        ``marks``: named high-water marks (e.g. ``{"activity": last input_seq whose records are
        all in this call or before}``) committed in the same transaction, so after a crash
        :meth:`marks` says exactly where to resume re-scoring the raw-input log. A mark never
        moves backwards.
        """
        if not items and not marks:
            return PutResult()
        groups: list[Group] = []
        ids: list[str] = []
        records: list[Mapping[str, Any]] = []
        last = None
        for stream, rid, record in items:  # runs of one stream
            if stream != last:
                ids, records, last = [], [], stream
                groups.append((stream, ids, records, None))
            ids.append(rid)
            records.append(record)
        return self._put(groups, marks)

    def put_groups(self, groups: Sequence[Group], *,
                   marks: Mapping[str, int] | None = None) -> PutResult:
        """:meth:`put_many` for records that come in runs of one stream, at a lower cost per
        record: ``(stream, ids, records, parts)`` groups, exactly as ``put_many`` of their
        items in group order (same chunks, dedup, budget, counters and marks). ``parts``,
        if not None, are the records already packed (:func:`pack_record`'s bytes, e.g. made
        while the records were fresh); ``records`` may then be None."""
        if not groups and not marks:
            return PutResult()
        return self._put(groups, marks)

    def _check_item(self, stream: str, rid: object, record: Mapping[str, Any] | None) -> None:
        if stream not in self.streams:
            raise OutboxError(f"unknown stream {stream!r}; known: {', '.join(self.streams)}")
        if record is not None and "record_id" in record:
            raise OutboxError(f"record {rid!r}: the field 'record_id' is reserved (the "
                              "outbox adds it)")

    def _put(self, groups: Sequence[Group], marks: Mapping[str, int] | None) -> PutResult:
        """The fast way when every id is new and every record encodes (the daemon's steady
        state): a stream's records packed a chunk at a time, ids checked with set operations.
        Otherwise (a replay, a record that cannot be encoded) record by record, refusing
        exactly the culprits, as ever."""
        checked: list[Group] = []
        for stream, ids, records, parts in groups:
            n = len(parts) if parts is not None else len(records or ())
            if len(ids) != n:
                raise ValueError(f"{len(ids)} ids for {n} records")
            if stream not in self.streams or (
                    records is not None and any("record_id" in r for r in records)):
                for i, rid in enumerate(ids):  # the first culprit, as put_many names it
                    self._check_item(stream, rid, records[i] if records is not None else None)
            if not _STR.issuperset(map(type, ids)):
                ids = [str(r) for r in ids]
            checked.append((stream, ids, records, parts))
        all_ids = [rid for g in checked for rid in g[1]]
        chunks = self._pack_chunks(checked) if len(set(all_ids)) == len(all_ids) else None
        if chunks is not None:
            fresh = chunks

            def only_new() -> tuple[list[_NewChunk], int] | None:
                return None if not self._recent.keys().isdisjoint(all_ids) else (fresh, 0)
            result = self._commit(only_new, marks)
            if result is not None:
                return result
        return self._put_one_by_one(checked, marks)

    def _pack_chunks(self, groups: list[Group]) -> list[_NewChunk] | None:
        """Per stream (first-seen order), capped chunks; records packed a chunk at a time.
        None if some record cannot be encoded."""
        per: dict[str, list[Group]] = {}
        for g in groups:
            per.setdefault(g[0], []).append(g)
        chunks: list[_NewChunk] = []
        max_n, max_b = self.chunk_max_records, self.chunk_max_bytes
        try:
            for stream, gs in per.items():
                rids = [rid for g in gs for rid in g[1]]
                if all(g[3] is None for g in gs):
                    records = [r for g in gs for r in g[2] or ()]
                    for i in range(0, len(rids), max_n):
                        ids, recs = rids[i:i + max_n], records[i:i + max_n]
                        payload = pack_records(ids, recs)
                        if len(payload) <= max_b:
                            chunks.append(_NewChunk.packed(stream, ids, recs, payload))
                        else:
                            chunks += self._cut(stream, ids, [pack_record(rid, rec) for rid, rec
                                                              in zip(ids, recs, strict=True)])
                else:
                    parts: list[bytes] = []
                    for _, ids, records, p in gs:
                        parts += p if p is not None else [
                            pack_record(rid, rec) for rid, rec in zip(ids, records or (),
                                                                      strict=True)]
                    chunks += self._chunk(stream, rids, parts)
        except (TypeError, ValueError, OverflowError):
            return None
        return chunks

    def _put_one_by_one(self, groups: list[Group], marks: Mapping[str, int] | None
                        ) -> PutResult:
        encoded: list[tuple[str, str, bytes]] = []
        for stream, ids, records, parts in groups:
            if parts is not None:
                encoded += [(stream, rid, part) for rid, part in zip(ids, parts, strict=True)]
                continue
            for rid, record in zip(ids, records or (), strict=True):
                try:
                    data = pack_record(rid, record)
                except (TypeError, ValueError, OverflowError) as exc:
                    # refused alone, before the transaction: its neighbours are stored
                    self.unencodable += 1
                    self.last_unencodable = f"record {rid!r} of stream {stream!r}: {exc}"
                    log.error("outbox: %s cannot be encoded; refused", self.last_unencodable)
                    continue
                encoded.append((stream, rid, data))
        result = self._commit(lambda: self._make_chunks(encoded), marks)
        assert result is not None
        return result

    def _commit(self, prepare: Callable[[], tuple[list[_NewChunk], int] | None],
                marks: Mapping[str, int] | None) -> PutResult | None:
        """One transaction: the chunks ``prepare`` gives (``(chunks, duplicates dropped)``,
        made under the lock with the dedup window loaded), budget and policies applied,
        counters, marks. None, writing nothing, if ``prepare`` says so."""
        now = time.time()
        with self._lock:
            self._check_open()
            db = self._db
            touched: set[str] = set()
            try:
                if not self._recent_loaded:
                    self._load_recent()
                prepared = prepare()
                if prepared is None:
                    return None
                chunks, duplicates = prepared
                db.execute("BEGIN IMMEDIATE")
                result, added, removed = self._insert(chunks, now, touched)
                self._save_counters(touched)
                if marks:
                    db.executemany(
                        "INSERT INTO marks (name, value) VALUES (?, ?) ON CONFLICT(name) "
                        "DO UPDATE SET value=max(value, excluded.value)",
                        [(str(k), int(v)) for k, v in marks.items()])
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot store records in {self.db_path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
            for stream, seq in removed:
                self._forget(stream, seq)
            gone = {seq for _, seq in removed}  # chunks of this write evicted by later ones
            for stream, seq, ids in added:
                if seq not in gone:
                    self._remember(stream, seq, ids)
            for k, v in (marks or {}).items():
                self._marks[str(k)] = max(self._marks.get(str(k), int(v)), int(v))
            self._maybe_sync()
        if duplicates:
            result = PutResult(result.stored, result.duplicates + duplicates, result.refused,
                               result.evicted)
        return result

    def _make_chunks(self, encoded: list[tuple[str, str, bytes]]) -> tuple[list[_NewChunk], int]:
        """Drop known ids, then group per stream (first-seen order) into capped chunks."""
        recent = self._recent
        groups: dict[str, tuple[list[str], list[bytes]]] = {}
        duplicates = 0
        seen: set[str] = set()
        for stream, rid, data in encoded:
            if rid in seen or rid in recent:
                duplicates += 1
                continue
            seen.add(rid)
            g = groups.get(stream)
            if g is None:
                g = groups[stream] = ([], [])
            g[0].append(rid)
            g[1].append(data)
        chunks = []
        for stream, (rids, parts) in groups.items():
            chunks += self._chunk(stream, rids, parts)
        return chunks, duplicates

    def _chunk(self, stream: str, rids: list[str], parts: list[bytes]) -> list[_NewChunk]:
        """One stream's packed records in capped chunks, in order."""
        chunks = []
        max_n, max_b = self.chunk_max_records, self.chunk_max_bytes
        for i in range(0, len(rids), max_n):
            sub = parts[i:i + max_n]
            if sum(map(len, sub)) <= max_b:
                chunks.append(_NewChunk.of(stream, rids[i:i + max_n], sub))
            else:
                chunks += self._cut(stream, rids[i:i + max_n], sub)
        return chunks

    def _cut(self, stream: str, rids: list[str], parts: list[bytes]) -> list[_NewChunk]:
        """Records past the byte cap, cut into chunks by bytes (at least one record each)."""
        max_b = self.chunk_max_bytes
        chunks = []
        start = nbytes = 0
        for j, part in enumerate(parts):
            if j > start and nbytes + len(part) > max_b:
                chunks.append(_NewChunk.of(stream, rids[start:j], parts[start:j]))
                start, nbytes = j, 0
            nbytes += len(part)
        chunks.append(_NewChunk.of(stream, rids[start:], parts[start:]))
        return chunks

    def _account(self, stream: str, count: int, size: int, created: float) -> None:
        self._count[stream] += count
        self._bytes[stream] += size
        self._used += size
        if self._oldest[stream] is None:
            self._oldest[stream] = created

    def _insert(self, chunks: list[_NewChunk], now: float, touched: set[str]
                ) -> tuple[PutResult, list[tuple[str, int, list[str]]], list[tuple[str, int]]]:
        """Chunk by chunk, applying the stream policies when the budget is reached. A chunk
        that cannot fit whole goes record by record (each a chunk of one), exactly as far as
        the budget and the policies allow. Returns the result, the chunks added and the
        chunks evicted (for the dedup window, once committed)."""
        evictor = _Evictor(self, touched)
        added: list[tuple[str, int, list[str]]] = []
        stored = duplicates = refused = superseded = 0
        todo = collections.deque(chunks)
        while todo:
            ch = todo.popleft()
            fits = self._used + ch.size <= self.budget_bytes
            if not fits and (ch.size > self.budget_bytes
                             or not evictor.can_fit(ch.stream, ch.size)):
                start = (self._fitting_suffix(ch, evictor.room(ch.stream))
                         if ch.count > 1 and self.streams[ch.stream].on_full == "drop_oldest"
                         else None)
                if start:
                    # A ring buffer keeps the newest: the records before the newest part that
                    # fits would be stored only to be evicted by their successors at once.
                    # Count them so (stored, then dropped) without writing them.
                    self._counters[ch.stream].dropped += start
                    touched.add(ch.stream)
                    stored += start
                    superseded += start
                    todo.appendleft(_NewChunk.of(ch.stream, ch.ids[start:], ch.parts[start:]))
                elif ch.count > 1:  # record by record, as far as they go
                    todo.extendleft(reversed(ch.singles()))
                else:
                    self._counters[ch.stream].refused += 1
                    touched.add(ch.stream)
                    refused += 1
                continue
            seq = self._insert_row(ch, now)
            if seq is None:
                duplicates += ch.count
                continue
            if not fits:
                evictor.make_room(ch.stream, ch.size, seq)
            self._account(ch.stream, ch.count, ch.size, now)
            added.append((ch.stream, seq, ch.ids))
            stored += ch.count
        evictor.apply()
        return (PutResult(stored, duplicates, refused, evictor.evicted + superseded), added,
                evictor.removed)

    @staticmethod
    def _fitting_suffix(ch: _NewChunk, room: int) -> int | None:
        """Where the longest tail of ``ch`` that fits in ``room`` bytes as one chunk starts;
        None if not even its last record fits."""
        payload = 0
        fixed = len(ch.stream) + ROW_OVERHEAD
        best = None
        for j in range(ch.count - 1, -1, -1):
            payload += len(ch.parts[j])
            if payload + fixed + 2 * len(chunk_id(ch.ids[j], ch.count - j)) > room:
                break
            best = j
        return best

    def _insert_row(self, ch: _NewChunk, now: float) -> int | None:
        """Insert a chunk; its seq, or None if this very chunk is stored already. Another
        chunk with the same first record and count (records re-stored after they left the
        dedup window) is stored under ``<chunk_id>~2``, ``~3``, ...: nothing is lost."""
        db = self._db
        cid, k = ch.chunk_id, 1
        while True:
            cur = db.execute(
                "INSERT OR IGNORE INTO chunks (stream, chunk_id, count, created, size, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)", (ch.stream, cid, ch.count, now, ch.size, ch.payload))
            if cur.rowcount == 1:
                return cur.lastrowid
            row = db.execute("SELECT payload FROM chunks WHERE chunk_id=?", (cid,)).fetchone()
            if row is not None and _ids_of(row[0]) == ch.ids:
                return None
            k += 1
            cid = f"{ch.chunk_id}~{k}"

    def _save_counters(self, streams: Iterable[str]) -> None:
        rows = []
        for s in streams:
            c = self._counters[s]
            rows.append((s, c.dropped, c.refused, c.reported_dropped, c.reported_refused))
        if rows:
            self._db.executemany(
                "INSERT INTO counters (stream, dropped, refused, reported_dropped, "
                "reported_refused) VALUES (?, ?, ?, ?, ?) ON CONFLICT(stream) DO UPDATE SET "
                "dropped=excluded.dropped, refused=excluded.refused, "
                "reported_dropped=excluded.reported_dropped, "
                "reported_refused=excluded.reported_refused", rows)

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            lease, lease_bytes = self._lease, self._lease_bytes
            self._load_state()
            self._lease, self._lease_bytes = lease, lease_bytes

    def _maybe_sync(self) -> None:
        """With synchronous=NORMAL, a checkpoint at most every ``fsync_interval_s`` bounds what
        a power cut can take (the checkpoint fsyncs the WAL, then the database)."""
        if self.fsync_interval_s == 0:
            return
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval_s:
            self._last_sync = now
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("outbox checkpoint failed: %s", exc)

    def marks(self) -> dict[str, int]:
        """The high-water marks committed with ``put_many(..., marks=...)``."""
        return dict(self._marks)

    # ---- reading and acknowledging ----------------------------------------------------------
    def pending(self, stream: str) -> tuple[int, int, float | None]:
        """``(records, bytes, oldest created)`` of a stream from memory: cheap, lock-free."""
        return self._count.get(stream, 0), self._bytes.get(stream, 0), self._oldest.get(stream)

    def next_batch(self, stream: str, *, max_records: int, max_bytes: int) -> list[OutboxChunk]:
        """The oldest chunks of ``stream`` in insertion order: whole chunks, at most
        ``max_records`` records and ``max_bytes`` of payload, except that the first chunk always
        comes. They stay stored, and are safe from eviction, until ``ack``; a new
        ``next_batch`` of the stream replaces that lease."""
        out: list[OutboxChunk] = []
        with self._lock:
            self._check_open()
            try:
                cur = self._db.execute(
                    "SELECT seq, chunk_id, count, payload, created, size FROM chunks "
                    "WHERE stream=? ORDER BY seq LIMIT ?", (stream, max(1, int(max_records))))
                records = total = charged = 0
                for seq, cid, n, payload, created, size in cur:
                    if out and (records + n > max_records or total + len(payload) > max_bytes):
                        break
                    records += n
                    total += len(payload)
                    charged += size
                    out.append(OutboxChunk(seq, stream, cid, n, payload, created, size))
                cur.close()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read records from {self.db_path}: {exc}") from exc
            if out:
                self._lease[stream] = out[-1].rowid
                self._lease_bytes[stream] = charged
            else:
                self._lease.pop(stream, None)
                self._lease_bytes.pop(stream, None)
        return out

    def ack(self, chunks: Sequence[OutboxChunk]) -> int:
        """Delete chunks the broker acknowledged; returns how many records were still stored."""
        if not chunks:
            return 0
        with self._lock:
            self._check_open()
            db = self._db
            streams = {c.stream for c in chunks}
            try:
                db.execute("BEGIN IMMEDIATE")
                removed: list[tuple[int, str, int, int]] = []
                seqs = [c.rowid for c in chunks]
                for i in range(0, len(seqs), 500):
                    part = seqs[i:i + 500]
                    removed += db.execute(
                        f"DELETE FROM chunks WHERE seq IN ({','.join('?' * len(part))}) "
                        "RETURNING seq, stream, count, size", part).fetchall()
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot delete acked records from {self.db_path}: "
                                  f"{exc}") from exc
            records = 0
            for seq, stream, n, size in removed:
                self._count[stream] -= n
                self._bytes[stream] -= size
                self._used -= size
                records += n
                self._forget(stream, seq)
            for stream in streams:
                lease = self._lease.get(stream)
                if lease is not None and lease <= max(c.rowid for c in chunks
                                                      if c.stream == stream):
                    del self._lease[stream]
                    self._lease_bytes.pop(stream, None)
                try:
                    self._oldest[stream] = self._query_oldest(stream)
                except sqlite3.Error as exc:  # committed already; only a figure is stale
                    log.warning("outbox: cannot read the oldest record of %s: %s", stream, exc)
            self._acks_since_vacuum += 1
            if self._acks_since_vacuum >= 64 or self._used == 0:
                self._acks_since_vacuum = 0
                self._give_back_space()
            self._maybe_sync()
            return records

    def _give_back_space(self) -> None:
        """Return free pages to the file system: all of them once the outbox has drained
        (at most every few seconds, since a steady stream drains it every batch and the file
        would only grow back), and while records wait only what takes the file beyond its
        budget. Free pages inside the budget are where the next writes go: giving them back
        mid-stream moved live pages to the file's start (a backlog draining while the stream
        went on rewrote itself every 64 acknowledgements, about a tenth of the daemon's CPU
        in a long flood, and as much extra wear on an SD card) for the file to grow again."""
        try:
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            if not free:
                return
            page = self._db.execute("PRAGMA page_size").fetchone()[0]
            now = time.monotonic()
            if self._used == 0:
                if (free * page < 256 * 1024
                        or now - self._drained_vacuum_at < DRAINED_VACUUM_INTERVAL_S):
                    return
                self._drained_vacuum_at = now
                # Nothing is stored: VACUUM rebuilds the few pages of counters and marks
                # (seqs survive: AUTOINCREMENT) at a tenth of what freeing page by page
                # costs (10 against 100 ms of CPU for 47 MB on the test host).
                try:
                    self._db.execute("VACUUM")
                except sqlite3.OperationalError:  # a statement still open: page by page
                    self._db.executescript("PRAGMA incremental_vacuum;")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                return
            total = self._db.execute("PRAGMA page_count").fetchone()[0]
            beyond = total * page - self.budget_bytes
            if beyond < max(1 << 20, self.budget_bytes // 8):
                return
            # executescript steps the pragma to completion (execute frees one page)
            self._db.executescript(f"PRAGMA incremental_vacuum({min(free, -(-beyond // page))});")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("outbox vacuum failed: %s", exc)

    # ---- drop reports -----------------------------------------------------------------------
    @property
    def has_unreported_drops(self) -> bool:
        return any(c.unreported for c in list(self._counters.values()))

    def take_drop_report(self) -> dict[str, Any] | None:
        """Evicted/refused counts not yet reported upstream, or None.

        ``streams[s]`` holds ``dropped``/``refused`` (since the last acknowledged report) and
        ``dropped_total``/``refused_total`` (since the outbox was created; idempotent to apply
        upstream). Call :meth:`ack_drop_report` once the broker has it.
        """
        with self._lock:
            per: dict[str, dict[str, int]] = {}
            for s, c in self._counters.items():
                if c.unreported:
                    per[s] = {"dropped": c.dropped - c.reported_dropped,
                              "refused": c.refused - c.reported_refused,
                              "dropped_total": c.dropped, "refused_total": c.refused}
            if not per:
                return None
            total = sum(c.dropped + c.refused for c in self._counters.values())
            return {"kind": "outbox_drops", "total": total, "streams": per}

    def ack_drop_report(self, report: Mapping[str, Any]) -> None:
        """Mark the counts in ``report`` as reported (later drops stay unreported)."""
        with self._lock:
            self._check_open()
            touched = []
            for s, v in report.get("streams", {}).items():
                c = self._counters.get(s)
                if c is None:
                    continue
                c.reported_dropped = max(c.reported_dropped, int(v["dropped_total"]))
                c.reported_refused = max(c.reported_refused, int(v["refused_total"]))
                touched.append(s)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._save_counters(touched)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot save counters in {self.db_path}: {exc}") from exc

    # ---- status -----------------------------------------------------------------------------
    def file_bytes(self) -> int:
        """Bytes the outbox files take on disk (database, WAL, shared memory index)."""
        total = 0
        for name in (self.db_path.name, self.db_path.name + "-wal", self.db_path.name + "-shm"):
            with contextlib.suppress(OSError):
                total += (self.dir / name).stat().st_size
        return total

    def stats(self) -> dict[str, Any]:
        """Backlog, oldest unsynced age, bytes, dropped and refused counts per stream; totals.

        From in-memory figures without taking the lock, so the event loop may call it while
        a writer is in a transaction (the figures are then a moment apart, never wrong for long).
        """
        now = time.time()
        streams = {}
        for s in self.by_priority:
            pol, c, oldest = self.streams[s], self._counters[s], self._oldest[s]
            streams[s] = {
                "priority": pol.priority, "on_full": pol.on_full,
                "backlog": self._count[s], "bytes": self._bytes[s],
                "oldest_unsynced_age_s": (round(max(0.0, now - oldest), 3)
                                          if oldest is not None else None),
                "dropped": c.dropped, "refused": c.refused,
                "unreported_dropped": c.dropped - c.reported_dropped,
                "unreported_refused": c.refused - c.reported_refused,
            }
        backlog = sum(self._count.values())
        used = self._used
        return {
            "streams": streams,
            "backlog": backlog,
            "bytes_used": used,
            "budget_bytes": self.budget_bytes,
            "file_bytes": self.file_bytes(),
            "dropped": sum(v["dropped"] for v in streams.values()),
            "refused": sum(v["refused"] for v in streams.values()),
            "unencodable": self.unencodable,
        }

    def check_integrity(self) -> list[str]:
        """Problems SQLite finds in the outbox file (``PRAGMA quick_check``), empty when it is
        sound. Reads every page of the database: seconds for a large outbox on a slow card,
        so run it at start or from a worker thread, not per batch. What to do with a damaged
        outbox: see :func:`edgeml.storage.outbox.quarantine`."""
        with self._lock:
            self._check_open()
            return quick_check(self._db)

    # ---- lifecycle --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"the outbox {self.dir} is closed")

    def close(self) -> None:
        """Checkpoint and close; the backlog stays on disk for the next open."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._release_file_lock()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
