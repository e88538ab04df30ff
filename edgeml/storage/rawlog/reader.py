"""Reading the raw log: listing segments, iterating records in seq order with filters, and
what a damaged region costs (logged, counted, skipped; an incomplete tail of the newest
segment is a record being written or a crash's torn tail, which the writer cuts at its next
open). :class:`RawLogReader` never modifies a file, so it is safe beside a running daemon."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgeml.errors import RawLogError
from edgeml.storage.rawlog.format import (
    _FILE_HDR,
    SEGMENT_RE,
    RawRecord,
    SegmentInfo,
    _header_ok,
    _info_from_meta,
    _info_from_seal,
    _parse_seal,
    _scan,
    _seal_path,
    _walk,
)
from edgeml.storage.rawlog.snapshot import build_manifest
from edgeml.topics import matcher as topic_matcher

log = logging.getLogger("edgeml.storage.rawlog")


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
        return build_manifest(self.directory, self.segments(), start_seq, end_seq)

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

